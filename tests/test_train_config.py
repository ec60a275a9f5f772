"""TrainConfig parsing and refusals, the sample order, the LR schedule and the objective's identity."""

import json

import pytest
import torch
import yaml

from mimir.testing import real_scheduler
from mimir.train import load_config, main_train
from mimir.train.data import GlobalOrder
from mimir.train.model import LRSchedule


def test_yaml_json_and_overrides_typed(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"lr": "1e-4", "num_frames": 9, "height": 32, "width": 32}))
    config = load_config(tmp_path / "a.yaml", ["batch_size=3", "fuser_lr=5e-4", "gradient_checkpointing=true",
                                               'validation_prompts=["a red ball", "two boxes"]', "resume=none"])
    assert (config.lr, config.batch_size, config.fuser_lr) == (1e-4, 3, 5e-4)
    assert config.gradient_checkpointing is True and config.resume is None
    assert config.validation_prompts == ["a red ball", "two boxes"]
    (tmp_path / "b.json").write_text(json.dumps({"dit": "lora", "lora_targets": ["to_q", "to_v"]}))
    config = load_config(tmp_path / "b.json", {"max_steps": "7"})
    assert (config.dit, config.lora_targets, config.max_steps) == ("lora", ["to_q", "to_v"], 7)
    config.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("values, message", [
    ({"num_frames": 10}, "frames must be 8k+1"),
    ({"num_frames": 13}, "frames must be 8k+1"),
    ({"height": 40}, "height must be a positive multiple of 16"),
    ({"width": 0}, "width must be a positive multiple of 16"),
    ({"warmup_step": 10}, "unknown config field(s) 'warmup_step' (did you mean 'warmup_steps'?)"),
    ({"dit": "half"}, "dit must be one of full, lora, frozen"),
    ({"lr": "fast"}, "lr must be float"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"text_dropout": 1.5}, "text_dropout must be in [0, 1)"),
    ({"t5_dropout": -0.1}, "t5_dropout must be in [0, 1)"),
    ({"validate_every": 10}, "validation_prompts is empty"),
])
def test_impossible_config_refused(values, message):
    with pytest.raises(ValueError) as error:
        load_config(None, values)
    assert message in str(error.value)


def test_model_demo_is_the_bundled_model_and_the_cli_needs_a_model(tmp_path, capsys):
    from mimir.loading import DEMO_MODEL_DIR
    from mimir.train import main_train

    assert load_config(None, {"model": "demo"}).model == str(DEMO_MODEL_DIR)
    with pytest.raises(SystemExit) as exit_:
        main_train([f"data={tmp_path}", f"output_dir={tmp_path / 'run'}"])
    assert exit_.value.code == 2 and "model= is required" in capsys.readouterr().err


def test_cli_refuses_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"num_frames": 12, "output_dir": str(run), "data": str(tmp_path),
                                                       "model": str(tmp_path)}))
    for argv in (["--config", str(tmp_path / "bad.yaml")],
                 ["--config", str(tmp_path / "bad.yaml"), "num_frames=9", "colour=red"],
                 ["--config", str(tmp_path / "bad.yaml"), "num_frames=9", f"data={tmp_path / 'missing'}"],
                 ["--config", str(tmp_path / "bad.yaml"), "num_frames=9", "data=null"]):
        with pytest.raises(SystemExit) as exit_:
            main_train(argv)
        assert exit_.value.code == 2
    errors = capsys.readouterr().err
    assert "frames must be 8k+1 (1, 9, 17, ..., 49, ..., 81), got 12" in errors
    assert "unknown config field(s) 'colour'" in errors
    assert "data " + str(tmp_path / "missing") + ": no such file or folder" in errors
    assert "needs data= (a dataset) or cache=" in errors
    assert not run.exists()  # nothing was written


def test_global_order_is_independent_of_process_count():
    """Two processes with batch 2 see, per micro-batch, exactly the samples one process with batch 4 sees."""
    single = GlobalOrder(7, 4, seed=3)
    ranks = [GlobalOrder(7, 2, rank=r, world=2, seed=3) for r in range(2)]
    take = lambda order, n: [next(it) for it in [iter(order)] for _ in range(n)]
    one = take(single, 4 * 5)
    two = [take(r, 2 * 5) for r in ranks]
    for m in range(5):
        assert one[4 * m:4 * m + 4] == two[0][2 * m:2 * m + 2] + two[1][2 * m:2 * m + 2]
    assert sorted(i for i, _ in one[:7]) == list(range(7))  # each epoch is a permutation
    resumed = take(GlobalOrder(7, 4, seed=3, start=2), 8)
    assert resumed == one[8:16]


def test_lr_schedule():
    constant, cosine = LRSchedule(3, 10, "constant"), LRSchedule(3, 10, "cosine")
    assert [constant(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert cosine(3) == 1.0 and cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert cosine(6) < cosine(5) < cosine(4) < 1.0


def test_v_loss_is_cogvideox_x0_weighted_loss():
    """The plain v-MSE equals CogVideoX's finetune loss: x0 error weighted by 1 / (1 - alpha_bar_t)."""
    scheduler = real_scheduler("ddim")
    torch.manual_seed(0)
    x0, noise, v_pred = torch.randn(3, 2, 4, 4, 4).double(), torch.randn(3, 2, 4, 4, 4).double(), torch.randn(3, 2, 4, 4, 4).double()
    t = torch.tensor([0, 500, 999])
    noisy = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    x0_pred = scheduler.get_velocity(v_pred, noisy, t)  # CogVideoX's scripts: sqrt(a) x_t - sqrt(1 - a) v_pred
    weights = (1 / (1 - scheduler.alphas_cumprod.double()[t])).view(-1, 1, 1, 1, 1)
    cogvideox = (weights * (x0_pred - x0) ** 2).mean()
    assert torch.allclose(cogvideox, ((v_pred - v) ** 2).mean(), rtol=1e-9)


def test_shipped_configs_load():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "mimir" / "train" / "configs"
    runs = {p.name: load_config(p) for p in folder.glob("mimir_*.yaml")} | {"demo_cpu.yaml": load_config(folder / "demo_cpu.yaml")}
    assert runs["mimir_5b.yaml"].gradient_checkpointing and runs["mimir_5b_lora.yaml"].dit == "lora"
    launch = {p.name: load_config_from_file(str(p)) for p in folder.glob("accelerate_*.yaml")}
    assert {n: (c.distributed_type.value, c.num_processes) for n, c in launch.items()} == {
        "accelerate_ddp.yaml": ("MULTI_GPU", 8), "accelerate_deepspeed_zero2.yaml": ("DEEPSPEED", 8),
        "accelerate_deepspeed_zero3.yaml": ("DEEPSPEED", 8), "accelerate_fsdp.yaml": ("FSDP", 8)}
    assert launch["accelerate_deepspeed_zero2.yaml"].deepspeed_config["zero_stage"] == 2
    assert launch["accelerate_fsdp.yaml"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "CogVideoXBlock"
    from diffusers.models.transformers import cogvideox_transformer_3d

    assert hasattr(cogvideox_transformer_3d, "CogVideoXBlock")  # the class FSDP wraps exists under that name

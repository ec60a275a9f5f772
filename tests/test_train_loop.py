"""The training loop on tiny models: overfitting, exact resume, export -> load -> generate."""

import statistics

import pytest
import torch
from safetensors.torch import load_file

from mimir.components import load_token_fuser, load_transformer
from mimir.loading import load_pipeline
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_train_components
from mimir.train import TrainConfig, build_cache, train
from mimir.train.checkpoint import WEIGHTS, list_checkpoints
from mimir.train.metrics import read_metrics
from mimir.video import read_video

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red square moves right"


@pytest.fixture(scope="module")
def cache(world_clips, tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_loop") / "cache"
    config = TrainConfig(data=str(world_clips(4)), cache=str(folder), validation_prompts=[PROMPT], **tiny_run)
    build_cache(config, tiny_train_components(), progress=False)
    return folder


@pytest.fixture
def config_for(tiny_run):
    """config_for(cache, run, **changes): a TrainConfig for a run in folder `run` from `cache` (None: from videos)."""

    def make(cache, run, **changes) -> TrainConfig:
        values = dict(cache=cache and str(cache), output_dir=str(run), batch_size=4, warmup_steps=0, weight_decay=0.0,
                      checkpoint_every=0, **tiny_run)
        return TrainConfig(**{**values, **changes})

    return make


def test_overfit_four_clips(cache, config_for, tmp_path):
    config = config_for(cache, tmp_path / "run", max_steps=200, lr=3e-3, lr_schedule="cosine", text_dropout=0.0)
    summary = train(config, tiny_train_components(), progress=False)
    losses = [loss for _, loss in summary["losses"]]
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    print(f"overfit: mean loss of steps 1-10 {first:.4f}, of steps 191-200 {last:.4f}, ratio {first / last:.1f}")
    assert first / last >= 5.0
    assert [row["loss"] for row in read_metrics(tmp_path / "run" / "metrics.csv")] == pytest.approx(losses, rel=1e-6)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_kill_and_resume_is_exact(cache, config_for, tmp_path):
    """Killed after step 3 (last checkpoint: step 2), resumed, the run ends with the uninterrupted run's weights."""
    changes = dict(max_steps=6, lr=1e-3, lr_schedule="cosine", warmup_steps=2, grad_accum=2, batch_size=2,
                   text_dropout=0.5, ema_decay=0.9, checkpoint_every=2, keep_checkpoints=2)
    whole = train(config_for(cache, tmp_path / "whole", **changes), tiny_train_components(), progress=False)

    def kill_after_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    killed = config_for(cache, tmp_path / "killed", **changes)
    with pytest.raises(KeyboardInterrupt):
        train(killed, tiny_train_components(), on_step=kill_after_step_3, progress=False)
    partial = tmp_path / "killed" / "checkpoints" / ".tmp-step-00000004"  # a kill in the middle of a write
    partial.mkdir()
    (partial / WEIGHTS).write_bytes(b"half")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(killed, tiny_train_components(), progress=False)
    resumed = train(config_for(cache, tmp_path / "killed", resume="latest", **changes), tiny_train_components(),
                    progress=False)
    assert resumed["start_step"] == 2 and not partial.exists()
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-00000004", "step-00000006"]
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000006" / WEIGHTS))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step-00000006" / WEIGHTS))
    assert a.keys() == b.keys() and len(a) > 10
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume: max |param difference| at step 6 = {diff:g} over {sum(v.numel() for v in a.values())} values")
    assert diff <= 1e-6
    assert [step for step, _ in resumed["losses"]] == [step for step, _ in whole["losses"][2:]]
    assert [loss for _, loss in resumed["losses"]] == pytest.approx([loss for _, loss in whole["losses"][2:]], rel=1e-6)
    rows = read_metrics(tmp_path / "killed" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the killed run's step 3 row was replaced


def test_lora_export_loads_and_generates_like_the_trained_model(world_clips, config_for, tmp_path):
    config = config_for(None, tmp_path / "run", max_steps=3, lr=5e-2, dit="lora", lora_rank=4, lora_alpha=4.0,
                        export=True, data=str(world_clips(4)), text_dropout=0.0, tensorboard=True,
                        validate_every=3, validation_prompts=[PROMPT, "a blue square moves up"], validation_steps=2)
    parts = tiny_train_components()
    summary = train(config, parts, progress=False)
    for i in range(2):  # validation videos from the live (LoRA) model, computing the prompts' features
        assert read_video(tmp_path / "run" / "validation" / f"step-00000003-{i}.mp4").shape == (9, 16, 16, 3)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    exported = summary["export"]
    assert set(exported) == {"fuser", "transformer", "pipeline"}
    # the trained model, rebuilt: a fresh tiny DiT + LoRA adapter with the checkpoint's trained weights
    reference = tiny_train_components()
    from peft import LoraConfig
    reference["transformer"].add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=list(config.lora_targets)))
    trained = load_file(str(list_checkpoints(tmp_path / "run")[-1] / WEIGHTS))
    for prefix, module in (("fuser.", reference["fuser"]), ("transformer.", reference["transformer"])):
        state = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
        assert not module.load_state_dict(state, strict=False).unexpected_keys
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items())  # LoRA moved off its zero init

    def generate(pipe):
        return pipe("a red square moves right", num_frames=9, height=16, width=16, steps=2, guidance=3.0, seed=1,
                    output_type="latent")

    expected = generate(MimirPipeline(**reference))
    loaded = load_pipeline(exported["pipeline"])
    assert torch.allclose(generate(loaded), expected, atol=1e-5)
    single, info = load_transformer(exported["transformer"], text_len=loaded.fuser.config.out_len)
    fuser, _ = load_token_fuser(exported["fuser"])
    assert info.kind == "transformer"
    assert torch.allclose(generate(MimirPipeline(**{**reference, "transformer": single, "fuser": fuser})), expected,
                          atol=1e-5)
    frames = loaded("a blue square moves up", num_frames=9, height=16, width=16, steps=2, guidance=3.0)
    assert frames.shape == (1, 9, 16, 16, 3) and torch.isfinite(frames).all()


def test_what_trains_follows_dit_and_fuser_lr(cache, config_for, tmp_path):
    """dit=frozen trains only the fuser; fuser_lr=0 leaves the fuser as it was while the DiT moves."""
    initial = tiny_train_components()
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    frozen = tiny_train_components()
    train(config_for(cache, tmp_path / "frozen", max_steps=2, lr=1e-2, dit="frozen", validate_every=2,
                     validation_prompts=[PROMPT], validation_steps=2), frozen, progress=False)
    # validation from a cache: the prompt's features were cached, only the VAE is loaded to decode
    assert read_video(tmp_path / "frozen" / "validation" / "step-00000002-0.mp4").shape == (9, 16, 16, 3)
    assert changed(frozen["fuser"], initial["fuser"]) and not changed(frozen["transformer"], initial["transformer"])
    saved = load_file(str(list_checkpoints(tmp_path / "frozen")[-1] / WEIGHTS))
    assert saved and all(k.startswith("fuser.") for k in saved)  # a checkpoint holds only what trains
    still = tiny_train_components()
    train(config_for(cache, tmp_path / "still", max_steps=2, lr=1e-2, fuser_lr=0.0, weight_decay=0.1), still,
          progress=False)
    assert not changed(still["fuser"], initial["fuser"]) and changed(still["transformer"], initial["transformer"])

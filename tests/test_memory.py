import pytest
import torch
from torch import nn

from mimir.memory import (
    FP8,
    Fp8Linear,
    MemoryOptions,
    apply_memory_options,
    compile_blocks,
    disable_block_swap,
    enable_block_swap,
    enable_fp8_storage,
    uncompile_blocks,
)
from mimir.offload import Placement, module_dtype, move_module
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_components, tiny_transformer


def dit(variant="5b", layers=3):
    torch.manual_seed(0)
    tr = tiny_transformer(variant, text_len=16)
    if layers != len(tr.transformer_blocks):  # more blocks than the tiny default, same architecture
        tr = type(tr)(**{**tr.config, "num_layers": layers}).eval()
    return tr


def run(tr, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 8, generator=g).to(dtype)
    text = torch.randn(2, 16, 32, generator=g).to(dtype)
    with torch.no_grad():
        return tr(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([900, 900]), return_dict=False)[0]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear_weight_bytes(module):
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, (nn.Linear, Fp8Linear)))


# ---- fp8 storage --------------------------------------------------------------------------------------
def test_fp8_linear_matches_fp32_and_stores_a_quarter():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    fp8 = Fp8Linear(linear, torch.float32)
    x = torch.randn(8, 256)
    assert fp8.weight.dtype == FP8 and not fp8.weight.requires_grad
    assert fp8.weight.element_size() * 4 == linear.weight.element_size()
    assert rel_err(fp8(x), linear(x)) < 0.04  # e4m3 keeps 3 mantissa bits: ~2-3% per weight, averaged in the dot
    assert torch.equal(fp8.bias, linear.bias)


def test_fp8_scaling_keeps_large_weights_that_plain_fp8_would_lose():
    linear = nn.Linear(16, 16)
    with torch.no_grad():
        linear.weight.mul_(5000.0)  # mostly beyond e4m3's maximum of 448
        linear.bias.zero_()
    x = torch.randn(4, 16)
    assert rel_err(Fp8Linear(linear, torch.float32)(x), linear(x)) < 0.05
    assert rel_err(Fp8Linear(linear, torch.float32, scaled=False)(x), linear(x)) > 0.3  # clamped at 448


def test_fp8_transformer_output_close_and_linear_memory_quartered():
    tr = dit()
    ref, before = run(tr), linear_weight_bytes(tr.transformer_blocks)
    converted = enable_fp8_storage(tr, torch.float32)
    assert converted == 3 * 8  # per block: norm1, norm2, q, k, v, out, ff in, ff out
    assert linear_weight_bytes(tr.transformer_blocks) * 4 == before
    assert module_dtype(tr) == torch.float32
    assert rel_err(run(tr), ref) < 0.05


def test_fp8_bf16_compute_dtype_is_reported_and_used():
    tr = dit().to(torch.bfloat16)
    ref = run(dit())
    enable_fp8_storage(tr, torch.bfloat16)
    assert module_dtype(tr) == torch.bfloat16  # not float8: the pipeline casts its inputs to this
    assert module_dtype(tr.transformer_blocks) == torch.bfloat16  # whose first parameter is an fp8 weight
    out = run(tr, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.06


def test_pipeline_runs_with_fp8_transformer():
    c = tiny_components(stabilizer_tokens=0)
    pipe = MimirPipeline(**c)
    cond, uncond = pipe.encode_prompt("a red circle moves to the left")
    ref = pipe.denoise(cond, uncond, num_frames=9, height=32, width=32, steps=2)
    enable_fp8_storage(pipe.transformer, torch.float32)
    out = pipe.denoise(cond, uncond, num_frames=9, height=32, width=32, steps=2)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 0.05


# ---- block swap ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("swapped", [1, 2, 3])
def test_block_swap_output_identical_and_blocks_visit_the_device(swapped):
    tr = dit(layers=3)
    ref = run(tr)
    swap = enable_block_swap(tr, swapped, "cpu", "cpu")
    homes = {i: [t.data_ptr() for t, _ in swap.homes[i]] for i in swap.swapped}
    seen = []

    def check(i):
        def hook(block, args, output):
            on_device = [t.data_ptr() for t in [*block.parameters(), *block.buffers()]]
            if i in homes:  # a swapped block computes on its device copy, not on its home tensors
                assert all(a != b for a, b in zip(on_device, homes[i]))
            seen.append(len(swap.copies))
        return hook

    handles = [b.register_forward_hook(check(i), prepend=True) for i, b in enumerate(tr.transformer_blocks)]
    assert torch.equal(run(tr), ref)
    assert torch.equal(run(tr), ref)  # second call: hooks stay consistent
    assert max(seen) <= 2  # the current swapped block and the prefetched next one
    assert swap.copies == {}  # every device copy was dropped after its block
    for i in swap.swapped:  # swapped blocks are back on their home tensors
        assert [t.data_ptr() for t, _ in swap.homes[i]] == homes[i]
    for h in handles:
        h.remove()


def test_block_swap_hooks_are_removed():
    tr = dit(layers=2)
    enable_block_swap(tr, 2, "cpu", "cpu")
    disable_block_swap(tr)
    for m in [tr, *tr.transformer_blocks]:
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert not hasattr(tr, "_mimir_block_swap") and not hasattr(tr, "_mimir_place")
    disable_block_swap(tr)  # a second disable is harmless


def test_block_swap_refuses_bad_counts_training_and_late_fp8():
    tr = dit(layers=2)
    with pytest.raises(ValueError, match="blocks_to_swap must be in 1..2"):
        enable_block_swap(tr, 3, "cpu")
    enable_block_swap(tr, 1, "cpu")
    with pytest.raises(RuntimeError, match="inference"):
        tr(hidden_states=torch.randn(1, 3, 4, 8, 8), encoder_hidden_states=torch.randn(1, 16, 32),
           timestep=torch.tensor([1]))
    with pytest.raises(RuntimeError, match="before block swap"):
        enable_fp8_storage(tr)


def test_placement_keeps_swapped_blocks_offloaded():
    """Placement moves a block-swapped transformer with `place`: swapped blocks stay where they are."""
    tr = dit(layers=3)
    enable_block_swap(tr, 2, "meta", "cpu")
    move_module(tr, torch.device("meta"))
    assert all(p.is_meta for p in tr.transformer_blocks[0].parameters())
    assert all(p.is_meta for p in tr.proj_out.parameters())
    assert not any(p.is_meta for b in tr.transformer_blocks[1:] for p in b.parameters())


def test_block_swap_with_fp8_in_the_pipeline():
    c = tiny_components(stabilizer_tokens=0)
    pipe = MimirPipeline(**c, placement=Placement("cpu", "cpu"))
    enable_fp8_storage(pipe.transformer, torch.float32)
    cond, uncond = pipe.encode_prompt("a red circle moves to the left")
    ref = pipe.denoise(cond, uncond, num_frames=9, height=32, width=32, steps=2)
    enable_block_swap(pipe.transformer, 2, "cpu", "cpu")
    assert torch.equal(pipe.denoise(cond, uncond, num_frames=9, height=32, width=32, steps=2), ref)


# ---- torch.compile ------------------------------------------------------------------------------------
def test_compile_blocks_same_output_and_no_recompile_across_steps():
    """Wired through torch.compile with a counting backend (inductor takes a minute on this CPU)."""
    torch._dynamo.reset()
    c = tiny_components(stabilizer_tokens=0)
    pipe = MimirPipeline(**c)
    cond, uncond = pipe.encode_prompt("a red circle moves to the left")
    ref = pipe.denoise(cond, uncond, num_frames=9, height=32, width=32, steps=3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_blocks(pipe.transformer, backend=backend)
    per_step = []
    out = pipe.denoise(cond, uncond, num_frames=9, height=32, width=32, steps=3,
                       callback=lambda i, n, x: per_step.append(len(graphs)))
    assert torch.equal(out, ref)
    assert per_step[0] > 0 and per_step == [per_step[0]] * 3  # compiled on step 1, never again
    uncompile_blocks(pipe.transformer)
    assert "forward" not in pipe.transformer.transformer_blocks[0].__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_options_apply_in_one_order_computing_in_the_loaded_dtype(dtype):
    """One policy for the CLI and the nodes: fp8 storage computes in the dtype the DiT was loaded in."""
    tr = dit().to(dtype)
    apply_memory_options(tr, MemoryOptions(fp8=True, blocks_to_swap=1), "cpu", "cpu")
    fp8 = [m for m in tr.modules() if type(m).__name__ == "Fp8Linear"]
    assert fp8 and all(m.bias is None or m.bias.dtype == dtype for m in fp8)
    assert tr._mimir_block_swap is not None
    with pytest.raises(ValueError, match="blocks_to_swap must be in 0..3"):
        apply_memory_options(dit(), MemoryOptions(blocks_to_swap=4), "cpu", "cpu")

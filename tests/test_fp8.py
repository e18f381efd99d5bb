"""--fp8: the frozen base's linears in FP8 (e4m3, row-wise scales) stay close to bf16 (CPU: torch._scaled_mm's CPU kernel)."""

import pytest
import torch
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.data.preprocess import collate
from glmtune.errors import GlmtuneError
from glmtune.models.fp8 import FP8, Fp8Linear, convert_frozen_linears, quantize_rows
from glmtune.models.introspect import decoder_layers
from glmtune.train.loss import label_loss
from test_fast_paths import EXAMPLES, prepared


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_row_scales_map_each_rows_largest_value_to_fp8s_largest():
    x = torch.randn(5, 32) * torch.tensor([[1e-3], [1.0], [10.0], [300.0], [1e4]])
    fp8, scale = quantize_rows(x)
    assert fp8.dtype == FP8 and scale.shape == (5, 1)
    assert torch.equal(fp8.float().abs().amax(dim=1), torch.full((5,), 448.0))
    assert relative_error(fp8.float() * scale, x) < 0.05  # e4m3: 3 mantissa bits


def test_fp8_linear_forward_and_input_gradient_are_close_to_bf16():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=True).to(torch.bfloat16).requires_grad_(False)
    fp8 = Fp8Linear(linear, torch.bfloat16)
    assert not list(fp8.parameters())  # frozen: buffers only, nothing for the optimizer
    x = torch.randn(3, 17, 256, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(3, 17, 512, dtype=torch.bfloat16)
    out = fp8(x)
    (grad_fp8,) = torch.autograd.grad(out, x, upstream)
    reference = linear(x)
    (grad_bf16,) = torch.autograd.grad(reference, x, upstream)
    assert out.shape == reference.shape and out.dtype == torch.bfloat16
    assert relative_error(out, reference) < 0.06
    assert relative_error(grad_fp8, grad_bf16) < 0.06


def test_fp8_linear_compiles_in_one_graph_with_the_eager_numbers():
    """--torch_compile traces the FP8 GEMMs (no graph break, so inductor fuses the row quantizations); a module-level
    float read inside the autograd.Function broke this before. The same FP8 values go in; the CPU's traced
    ``_scaled_mm`` sums in another order (0.3% apart here), against the 6% FP8 itself is allowed from bf16."""
    torch.manual_seed(0)
    fp8 = Fp8Linear(nn.Linear(64, 128, bias=False).to(torch.bfloat16).requires_grad_(False), torch.bfloat16)
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(2, 9, 128, dtype=torch.bfloat16)
    results = []
    for module in (fp8, torch.compile(fp8, backend="aot_eager", fullgraph=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        results.append((out, *torch.autograd.grad(out, x, upstream)))
    (eager_out, eager_grad), (compiled_out, compiled_grad) = results
    assert relative_error(compiled_out, eager_out) < 0.01
    assert relative_error(compiled_grad, eager_grad) < 0.01


def test_conversion_frees_each_bf16_weight_as_it_goes_and_keeps_one_fp8_copy(monkeypatch):
    """While the model converts, the bf16 weights already replaced are gone (a list of the modules kept them all
    alive until the end: the whole model twice over, the peak of run 19's --fp8 row), and each frozen weight is
    stored once, in FP8 (no transposed second copy)."""
    import gc
    import weakref

    import glmtune.models.fp8 as fp8_module

    layers = nn.Sequential(*(nn.Linear(64, 128).to(torch.bfloat16).requires_grad_(False) for _ in range(3)))
    originals = [weakref.ref(layer.weight) for layer in layers]
    alive_at_each_conversion = []

    class Counted(Fp8Linear):
        def __init__(self, linear, compute_dtype):
            gc.collect()
            alive_at_each_conversion.append(sum(ref() is not None for ref in originals))
            super().__init__(linear, compute_dtype)

    monkeypatch.setattr(fp8_module, "Fp8Linear", Counted)
    assert convert_frozen_linears(layers, torch.bfloat16) == 3
    assert alive_at_each_conversion == [3, 2, 1]
    assert {name: tuple(buffer.shape) for name, buffer in layers[0].state_dict().items()} == {
        "weight_fp8": (128, 64), "weight_scale": (128, 1), "bias": (128,)}


def test_lora_on_an_fp8_base_gives_close_loss_and_gradients(tiny_llama):
    batch = collate(EXAMPLES, 0)
    results = []
    for use_fp8 in (False, True):
        model = prepared(tiny_llama, "lora", torch.bfloat16)
        if use_fp8:
            # q_proj, v_proj under LoRA (their base layers) and k, o, gate, up, down: 7 per layer
            assert convert_frozen_linears(decoder_layers(model), torch.bfloat16) == 7 * 2
            assert all(type(m) is not nn.Linear or m.weight.requires_grad for m in decoder_layers(model).modules())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = label_loss(model, batch["input_ids"], batch["labels"])
        loss.backward()
        results.append((loss.item(), {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_bf16, grads_bf16), (loss_fp8, grads_fp8) = results
    assert loss_fp8 == pytest.approx(loss_bf16, rel=0.01)
    assert grads_fp8.keys() == grads_bf16.keys()
    for name, gradient in grads_bf16.items():
        assert torch.cosine_similarity(grads_fp8[name], gradient, dim=0) > 0.98, name


def test_fp8_trains_through_the_cli_path_and_refuses_full_fine_tuning(tiny_llama, demo_train_file, tmp_path):
    from glmtune.recipes.train import run_train

    common = dict(do_train=True, model_name_or_path=str(tiny_llama), train_file=str(demo_train_file), max_train_samples=8,
                  per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, logging_steps=1, save_steps=0,
                  report_to="none", fp8=True, bf16=True)
    result = run_train(GlmtuneConfig(output_dir=str(tmp_path / "lora"), finetuning_type="lora", **common))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    with pytest.raises(GlmtuneError, match="--fp8"):
        run_train(GlmtuneConfig(output_dir=str(tmp_path / "full"), finetuning_type="full", **common))

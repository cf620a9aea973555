"""Speed switches (autolora/engine/speed.py, models/precision.py, Method.prepare): bf16 autocast with an fp32 first conv, resolved defaults, no wasted passes."""
import copy
import io
import math

import pytest
import torch

from autolora.methods import resolve_config
from autolora.engine.speed import resolve_runtime
from autolora.models.precision import FP32FirstLayer, keep_first_conv_fp32
from autolora.config import TrainConfig
from autolora.methods import create_method
from autolora.models import create_model


def _cfg(**kw):
    base = dict(arch="tiny", input_size="none", batch_size=8, train_steps=3, device="cpu", epochs=1)
    return resolve_config(TrainConfig(**{**base, **kw}))


def test_first_conv_runs_fp32_under_autocast_so_the_perturbation_survives():
    model = create_model("tiny", 3, "none").eval()
    ref = copy.deepcopy(model)
    conv = keep_first_conv_fp32(model)
    assert isinstance(conv, FP32FirstLayer) and isinstance(conv, torch.nn.Conv2d)
    assert model.state_dict().keys() == ref.state_dict().keys()  # same keys: checkpoints and export unchanged
    torch.save(model, io.BytesIO())  # still picklable
    x = model.preprocess(torch.rand(2, 3, 16, 16))
    d = 0.25 / 255 / 0.25  # a quarter of a pixel level, normalised: below bf16's resolution around 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_d = conv(x), conv(x + d)
        plain = ref.backbone.conv1(x + d) - ref.backbone.conv1(x)  # the stock layer under autocast
    assert out.dtype == torch.float32
    exact = ref.backbone.conv1(x + d) - ref.backbone.conv1(x)  # fp32, no autocast
    assert torch.allclose(out_d - out, exact, atol=1e-5)
    assert (plain.float() - exact).abs().max() > 10 * (out_d - out - exact).abs().max()  # bf16 would round it
    # the input gradient through the first layer is the fp32 one
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (g,) = torch.autograd.grad(conv(xg).float().sum(), [xg])
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref.backbone.conv1(xr).sum(), [xr])
    assert torch.allclose(g, gr, atol=1e-5)


def test_amp_step_attacks_in_bf16_and_evaluates_in_fp32():
    from autolora.eval import evaluate
    from autolora.engine.loop import Context, make_optimizer, train_epoch

    cfg = _cfg(amp=True, channels_last=False)
    m = create_method("vanilla_rft", create_model("tiny", 3, "none"), cfg)
    m.prepare(torch.device("cpu"), amp=True, channels_last=False)
    assert m.attack.autocast_dtype == torch.bfloat16
    seen = []
    h = m.model.head.register_forward_hook(lambda mod, i, o: seen.append((mod.training, torch.is_grad_enabled(),
                                                                          o.dtype)))
    opt = make_optimizer(m, cfg)
    ctx = Context(cfg, torch.device("cpu"), None, lambda s: None, False, amp=True, channels_last=False)
    batch = (torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,)))
    stats = train_epoch(m, opt, ctx, [batch], "main", 0)
    assert math.isfinite(stats["train_loss"]) and stats["train_loss"] > 0
    assert [s[2] for s in seen] == [torch.bfloat16] * (3 + 2)  # 3 attack passes + natural + adversarial
    assert [s[0] for s in seen] == [False] * 3 + [True] * 2
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation ignores a caller's autocast
        evaluate(m.eval_model(), torch.utils.data.TensorDataset(*batch), attacks=["clean", "pgd2"], eps=8 / 255,
                 step_size=2 / 255)
    assert seen and all(s[2] == torch.float32 for s in seen)
    h.remove()


def test_runtime_defaults_are_resolved_per_device_and_model():
    tiny = create_model("tiny", 3, "none")
    cpu = resolve_runtime(_cfg(), torch.device("cpu"), tiny)
    assert (cpu.amp, cpu.channels_last) == (False, True)  # as measured fastest on CPU (bench/results)
    gpu = resolve_runtime(_cfg(), torch.device("cuda"), tiny)
    assert (gpu.amp, gpu.channels_last) == (True, True)
    vit = resolve_runtime(_cfg(arch="test_vit"), torch.device("cuda"), create_model("test_vit", 3, "16"))
    assert (vit.amp, vit.channels_last) == (True, False)  # a patch embedding alone is no conv net
    explicit = resolve_runtime(_cfg(amp=False, channels_last=True), torch.device("cuda"), tiny)
    assert (explicit.amp, explicit.channels_last) == (False, True)
    assert "amp: false" in cpu.to_yaml() and "channels_last: true" in cpu.to_yaml()
    vit_cpu = resolve_runtime(_cfg(arch="test_vit"), torch.device("cpu"), create_model("test_vit", 3, "16"))
    assert (vit_cpu.amp, vit_cpu.channels_last) == (False, False)


def _count_merges(branch):
    calls = []
    orig = branch._merge

    def counted(backbone):
        calls.append(torch.is_grad_enabled())
        return orig(backbone)

    branch._merge = counted
    return calls


def test_lora_weights_merged_once_per_attack_and_once_per_step():
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4,))
    # Madry fine-tuning with a LoRa adapter attacks the adapted model: one merge for all k attack steps
    m = create_method("madry_ft", create_model("tiny", 3, "none"), _cfg(method="madry_ft", peft="lora"))
    calls = _count_merges(m.net.lora)
    m.attack(x, y)
    assert calls == [False]  # once, without autograd
    m.train_mode()
    m.training_step(x, y)["loss"].backward()
    assert calls == [False, False, True]  # + the attack of the step, + the training forward
    # AutoLoRa: the attack runs on the plain model, the natural path merges once per step
    a = create_method("autolora", create_model("tiny", 3, "none"), _cfg(method="autolora"))
    calls = _count_merges(a.net.lora)
    a.train_mode()
    a.training_step(x, y)["loss"].backward()
    assert calls == [True]
    assert all(p.grad is not None for p in a.net.lora.parameters())


def test_attack_leaves_no_parameter_gradients():
    m = create_method("vanilla_rft", create_model("tiny", 3, "none"), _cfg())
    m.attack(torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4,)))
    assert all(p.grad is None for p in m.net.parameters())


@pytest.mark.parametrize("method", ["vanilla_rft", "autolora"])
def test_channels_last_step_matches_contiguous(method):
    from autolora.engine.loop import Context, make_optimizer, train_epoch

    batch = (torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,)))
    out = []
    for cl in (False, True):
        torch.manual_seed(0)
        cfg = _cfg(method=method, channels_last=cl)
        m = create_method(method, create_model("tiny", 3, "none"), cfg)
        m.attack.steps = 0  # random start only: no sign() to flip
        m.prepare(torch.device("cpu"), amp=False, channels_last=cl)
        ctx = Context(cfg, torch.device("cpu"), None, lambda s: None, False, amp=False, channels_last=cl)
        torch.manual_seed(1)
        train_epoch(m, make_optimizer(m, cfg), ctx, [batch], "main", 0)
        out.append(torch.cat([p.detach().flatten() for p in m.net.parameters()]))
    assert torch.allclose(out[0], out[1], atol=1e-4)

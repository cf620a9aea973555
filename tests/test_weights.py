"""Pretrained-weight loading: every checkpoint format, strict key checks, safe unpickling, shortcuts.

Every checkpoint is generated here (random weights); nothing is downloaded: `hf_hub_download` is
replaced by a guard that fails the test unless a test installs its own fake.
"""
import fractions
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from autolora import weights as W
from autolora.errors import UserError
from autolora.models import create_model


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import huggingface_hub

    def guard(*a, **k):  # pragma: no cover - only reached by a buggy test
        raise AssertionError("tests must not download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", guard)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("AUTOLORA_CACHE", raising=False)


def plain_tiny(num_classes=1000, seed=0):
    """The state dict of a plain tiny model with an ImageNet-sized `fc` head."""
    torch.manual_seed(seed)
    src = create_model("tiny", num_classes)
    return {k: v.clone() for k, v in src.plain_state_dict().items()}


def robustness_ckpt(plain, key="model"):
    """A robustness-library checkpoint (Salman et al. 2020 layout) around a plain state dict."""
    sd = {f"module.model.{k}": v for k, v in plain.items()}
    # the attacker's copy differs here so that loading the wrong copy would be noticed
    sd.update({f"module.attacker.model.{k}": torch.zeros_like(v) for k, v in plain.items()})
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    sd.update({"module.normalizer.new_mean": mean, "module.normalizer.new_std": std,
               "module.attacker.normalize.new_mean": mean, "module.attacker.normalize.new_std": std})
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(2)
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    return {key: sd, "optimizer": opt.state_dict(), "schedule": sched.state_dict(), "epoch": 90}


def assert_backbone_equals(model, plain, head_key="fc"):
    got = model.backbone.state_dict()
    body = {k: v for k, v in plain.items() if not k.startswith(head_key + ".")}
    assert set(got) == set(body)
    for k, v in body.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


# -- formats ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,wrap,prefix", [
    ("plain.pth", None, ""),
    ("wrapped.pt", "state_dict", "module."),
    ("wrapped.bin", "model", ""),
    ("dp.pth", None, "module."),
])
def test_torch_state_dicts(tmp_path, name, wrap, prefix):
    plain = plain_tiny()
    sd = {prefix + k: v for k, v in plain.items()}
    torch.save({wrap: sd, "epoch": 3} if wrap else sd, tmp_path / name)
    model = create_model("tiny", 10)
    head_before = model.head.weight.clone()
    info = W.load_weights(model, str(tmp_path / name))
    assert_backbone_equals(model, plain)
    assert torch.equal(model.head.weight, head_before)  # our head is untouched
    assert info["format"] == "torch" and info["source"] == str(tmp_path / name)
    assert sorted(info["dropped"]) == ["fc.bias", "fc.weight"]
    assert info["num_tensors"] == len(model.backbone.state_dict())


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_robustness_checkpoint(tmp_path, key):
    plain = plain_tiny()
    path = tmp_path / "resnet18_linf_eps4.0.ckpt"
    torch.save(robustness_ckpt(plain, key), path)
    model = create_model("tiny", 10)
    info = W.load_weights(model, str(path))
    assert_backbone_equals(model, plain)  # the module.model copy, not the (zeroed) attacker copy
    assert info["format"] == "robustness"
    dropped = set(info["dropped"])
    assert {"fc.weight", "fc.bias"} <= dropped
    assert {"normalizer.new_mean", "normalizer.new_std", "attacker.normalize.new_mean"} <= dropped
    assert sum(k.startswith("attacker.model.") for k in dropped) == len(plain)


def test_safetensors_and_own_export(tmp_path):
    plain = plain_tiny()
    save_file(plain, tmp_path / "w.safetensors")
    model = create_model("tiny", 10)
    info = W.load_weights(model, str(tmp_path / "w.safetensors"))
    assert info["format"] == "safetensors"
    assert_backbone_equals(model, plain)

    # our own export (plain layout with a 10-class head) into a 5-class model; a directory works too
    save_file(model.plain_state_dict(), tmp_path / "model.safetensors")
    other = create_model("tiny", 5)
    info = W.load_weights(other, str(tmp_path))
    assert info["path"] == str(tmp_path / "model.safetensors")
    assert sorted(info["dropped"]) == ["fc.bias", "fc.weight"]
    assert_backbone_equals(other, plain)
    assert W.read_state_dict(str(tmp_path / "model.safetensors")).keys() == model.plain_state_dict().keys()


def test_classifier_state_dict_and_half_precision(tmp_path):
    src = create_model("tiny", 7)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}, tmp_path / "c.pt")
    model = create_model("tiny", 3)
    info = W.load_weights(model, str(tmp_path / "c.pt"))
    assert sorted(info["dropped"]) == ["head.bias", "head.weight"]
    w = model.backbone.conv1.weight
    assert w.dtype == torch.float32 and torch.allclose(w, src.backbone.conv1.weight, atol=1e-2)


@pytest.fixture(scope="module")
def resnet18_robust(tmp_path_factory):
    """A Salman-layout resnet18 checkpoint with real torchvision keys (attacker shares storage: ~45 MB)."""
    import torchvision

    torch.manual_seed(1)
    plain = torchvision.models.resnet18(weights=None).state_dict()
    sd = {f"module.model.{k}": v for k, v in plain.items()}
    sd.update({f"module.attacker.model.{k}": v for k, v in plain.items()})
    sd.update({"module.normalizer.new_mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
               "module.normalizer.new_std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)})
    path = tmp_path_factory.mktemp("salman") / "resnet18_linf_eps4.0.ckpt"
    torch.save({"model": sd, "epoch": 90, "schedule": None}, path)
    return path, plain


def test_resnet18_torchvision_keys(resnet18_robust, tmp_path):
    path, plain = resnet18_robust
    model = create_model("resnet18", 10)
    info = W.load_weights(model, str(path))
    assert info["format"] == "robustness"
    assert info["num_tensors"] == len(model.backbone.state_dict()) == len(plain) - 2
    assert "model.fc.weight" not in info["dropped"] and {"fc.weight", "fc.bias"} <= set(info["dropped"])
    assert_backbone_equals(model, plain)
    # plain torchvision state dict as safetensors
    save_file({k: v.contiguous() for k, v in plain.items()}, tmp_path / "r18.safetensors")
    model = create_model("resnet18", 10)
    W.load_weights(model, str(tmp_path / "r18.safetensors"))
    assert_backbone_equals(model, plain)


def test_timm_vit_keys(tmp_path):
    import timm

    torch.manual_seed(2)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    save_file(plain, tmp_path / "vit.safetensors")
    model = create_model("vit_tiny_patch16_224", 10)
    assert model.spec.head_key == "head"
    info = W.load_weights(model, str(tmp_path / "vit.safetensors"))
    assert sorted(info["dropped"]) == ["head.bias", "head.weight"]
    assert_backbone_equals(model, plain, head_key="head")


# -- strictness ------------------------------------------------------------------------------------
def test_wrong_arch_is_refused_and_nothing_loads(tmp_path):
    torch.save(plain_tiny(), tmp_path / "tiny.pth")
    model = create_model("small", 10)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(UserError, match="shape mismatches") as e:
        W.load_weights(model, str(tmp_path / "tiny.pth"))
    assert "--arch" in str(e.value) and "different architecture" in str(e.value)
    assert "\n" not in str(e.value)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    plain = plain_tiny()
    sd = {k: v for k, v in plain.items() if not k.startswith("layer3.")}
    sd.update({f"extra{i}.weight": torch.zeros(1) for i in range(12)})
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        W.load_weights(create_model("tiny", 10), str(tmp_path / "bad.pth"))
    msg = str(e.value)
    n_missing = sum(k.startswith("layer3.") and not k.endswith("num_batches_tracked") for k in plain)
    assert f"{n_missing} missing keys" in msg and "layer3.0.conv1.weight" in msg
    assert "12 unexpected keys" in msg and "(+2 more)" in msg and "--arch" in msg


def test_missing_num_batches_tracked_is_fine(tmp_path):
    plain = {k: v for k, v in plain_tiny().items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, tmp_path / "old.pth")
    W.load_weights(create_model("tiny", 10), str(tmp_path / "old.pth"))


# -- safe unpickling -------------------------------------------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": plain_tiny(), "payload": Evil(str(marker))}, path)
    for call in (lambda: W.load_weights(create_model("tiny", 10), str(path)), lambda: W.read_state_dict(str(path))):
        with pytest.raises(UserError, match="--trust-pickle") as e:
            call()
        assert "only for trusted legacy files" in str(e.value)
        assert not marker.exists()


def test_trust_pickle_opt_in(tmp_path):
    plain = plain_tiny()
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": plain, "args": fractions.Fraction(1, 3)}, path)  # harmless non-tensor global
    with pytest.raises(UserError, match="--trust-pickle"):
        W.load_weights(create_model("tiny", 10), str(path))
    model = create_model("tiny", 10)
    with pytest.warns(UserWarning, match="arbitrary code"):
        W.load_weights(model, str(path), trust_pickle=True)
    assert_backbone_equals(model, plain)
    # a file that is safe anyway loads without the warning even when the flag is given
    torch.save(plain, tmp_path / "safe.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W.load_weights(create_model("tiny", 10), str(tmp_path / "safe.pt"), trust_pickle=True)


@pytest.mark.parametrize("name,content", [
    ("junk.pth", os.urandom(512)), ("text.pt", b"not a checkpoint"), ("junk.safetensors", b"\x10\x00" * 8),
])
def test_corrupt_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match="cannot read") as e:
        W.load_weights(create_model("tiny", 10), str(tmp_path / name))
    assert "--trust-pickle" not in str(e.value)


def test_no_state_dict_inside(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="no state dict"):
        W.load_weights(create_model("tiny", 10), str(tmp_path / "x.pt"))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        W.load_weights(create_model("tiny", 10), str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="shortcuts look like"):
        W.resolve_source("salmon:resnet18_linf_eps4")
    with pytest.raises(UserError, match="not found"):
        W.read_state_dict(str(tmp_path / "nope.safetensors"))


# -- salman: shortcuts -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("salman:resnet18_linf_eps4", ("resnet18", 4, "resnet18_linf_eps4.0.ckpt")),
    ("salman:resnet18_linf_eps4.0", ("resnet18", 4, "resnet18_linf_eps4.0.ckpt")),
    ("salman:resnet50_linf_eps8", ("resnet50", 8, "resnet50_linf_eps8.0.ckpt")),
    ("salman:resnet18_linf_eps1", ("resnet18", 1, "resnet18_linf_eps1.0.ckpt")),
    ("salman:ResNet50_linf_eps0", ("resnet50", 0, "resnet50_linf_eps0.ckpt")),
])
def test_salman_names(name, expected):
    assert W.parse_salman(name) == expected
    assert len(W.salman_names()) == len(W.SALMAN_ARCHS) * len(W.SALMAN_EPS) == 10


@pytest.mark.parametrize("name", [
    "salman:resnet34_linf_eps4", "salman:resnet18_linf_eps3", "salman:resnet18_l2_eps3", "salman:", "salman:resnet18_linf_eps4.5",
])
def test_unknown_salman_names(name):
    with pytest.raises(UserError, match="valid names are") as e:
        W.resolve_source(name)
    assert "salman:resnet18_linf_eps4" in str(e.value)


def test_salman_download_and_arch(monkeypatch, resnet18_robust, tmp_path):
    import huggingface_hub

    path, plain = resnet18_robust
    calls = []

    def fake(repo_id, filename, cache_dir=None, **kw):
        calls.append((repo_id, filename, cache_dir))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    # wrong --arch: refused before any download
    with pytest.raises(UserError, match="--arch resnet18"):
        W.load_weights(create_model("tiny", 10), "salman:resnet18_linf_eps4")
    assert calls == []
    model = create_model("resnet18", 10)
    with pytest.raises(UserError, match="--arch resnet50"):
        W.load_weights(model, "salman:resnet50_linf_eps4")
    # matching arch: downloads into cache_dir (else $AUTOLORA_CACHE) and loads
    info = W.load_weights(model, "salman:resnet18_linf_eps4", cache_dir=str(tmp_path))
    assert calls == [(W.SALMAN_REPO, "resnet18_linf_eps4.0.ckpt", str(tmp_path))]
    assert info["format"] == "robustness" and info["path"] == str(path)
    assert_backbone_equals(model, plain)
    monkeypatch.setenv("AUTOLORA_CACHE", str(tmp_path / "env"))
    W.resolve_source("salman:resnet50_linf_eps0")
    assert calls[-1] == (W.SALMAN_REPO, "resnet50_linf_eps0.ckpt", str(tmp_path / "env"))


def test_salman_download_failure(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError) as e:
        W.resolve_source("salman:resnet18_linf_eps8")
    msg = str(e.value)
    assert "failed" in msg and W.SALMAN_REPO in msg and "resnet18_linf_eps8.0.ckpt" in msg
    assert "--weights PATH" in msg and "manually" in msg and "\n" not in msg

"""Pretrained-weight loading: every checkpoint format, strict key checks, safe unpickling, shortcuts.

Every checkpoint is generated here (random weights), those of the robustness library by its own training
and save code; nothing is downloaded: `hf_hub_download` is replaced by a guard that fails the test unless a
test installs its own fake.
"""
import fractions
import json
import functools
import os
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from autolora.models import weights as W
from autolora.errors import UserError
from autolora.models import create_model, sources
from autolora.models.sources import salman


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
    with pytest.raises(UserError, match="'salmon:' is not a source \\(did you mean 'salman'\\?\\)"):
        W.resolve_source("salmon:resnet18_linf_eps4")
    with pytest.raises(UserError, match="not found"):
        W.read_state_dict(str(tmp_path / "nope.safetensors"))


# -- salman: every model of madrylab/robust-imagenet-models ----------------------------------------------
# microsoft/robust-models-transfer's README tables (the HF model card's) plus the two standard L∞ models of the
# repo's upload commit 19f056c: the exact file names
L2_EPS = ["0", "0.01", "0.03", "0.05", "0.1", "0.25", "0.5", "1", "3", "5"]
PUBLISHED = (
    [f"{a}_l2_eps{e}.ckpt" for a in ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_4") for e in L2_EPS]
    + [f"{a}_l2_eps{e}.ckpt" for a in ("densenet", "mnasnet", "mobilenet", "resnext50_32x4d", "shufflenet", "vgg16_bn")
       for e in ("0", "3")]
    + [f"{a}_linf_eps{e}.ckpt" for a in ("resnet18", "resnet50", "wide_resnet50_2") for e in ("0.5", "1.0", "2.0", "4.0", "8.0")]
    + ["resnet18_linf_eps0.ckpt", "resnet50_linf_eps0.ckpt"]
)


def test_salman_offers_exactly_the_published_files():
    assert len(PUBLISHED) == len(set(PUBLISHED)) == 69
    assert sorted(salman.files().values()) == sorted(PUBLISHED)


@pytest.mark.parametrize("name,arch,file,short", [
    ("salman:resnet18_linf_eps4", "resnet18", "resnet18_linf_eps4.0.ckpt", "resnet18_linf_eps4"),
    ("salman:resnet18_linf_eps4.0", "resnet18", "resnet18_linf_eps4.0.ckpt", "resnet18_linf_eps4"),
    ("salman:resnet50_linf_eps8", "resnet50", "resnet50_linf_eps8.0.ckpt", "resnet50_linf_eps8"),
    ("salman:resnet18_linf_eps0.5", "resnet18", "resnet18_linf_eps0.5.ckpt", "resnet18_linf_eps0.5"),
    ("salman:ResNet50_linf_eps0", "resnet50", "resnet50_linf_eps0.ckpt", "resnet50_linf_eps0"),
    ("salman:resnet18_l2_eps3", "resnet18", "resnet18_l2_eps3.ckpt", "resnet18_l2_eps3"),
    ("salman:resnet18_l2_eps3.0", "resnet18", "resnet18_l2_eps3.ckpt", "resnet18_l2_eps3"),
    ("salman:resnet50_l2_eps0.01.ckpt", "resnet50", "resnet50_l2_eps0.01.ckpt", "resnet50_l2_eps0.01"),
    ("salman:wide_resnet50_2_linf_eps4", "wide_resnet50_2", "wide_resnet50_2_linf_eps4.0.ckpt", "wide_resnet50_2_linf_eps4"),
    ("salman:wide_resnet50_4_l2_eps5", "wide_resnet50_4", "wide_resnet50_4_l2_eps5.ckpt", "wide_resnet50_4_l2_eps5"),
    ("salman:densenet_l2_eps3", "densenet161", "densenet_l2_eps3.ckpt", "densenet_l2_eps3"),
    ("salman:densenet161_l2_eps0", "densenet161", "densenet_l2_eps0.ckpt", "densenet_l2_eps0"),
    ("salman:shufflenet_l2_eps3", "shufflenet_v2_x1_0", "shufflenet_l2_eps3.ckpt", "shufflenet_l2_eps3"),
])
def test_salman_names(name, arch, file, short):
    """Every spelling of a checkpoint resolves to its file and to one name a run records (one of `salman.names()`)."""
    ref = sources.parse(name)
    assert (ref.source, ref.arch, ref.info["file"], ref.name) == ("salman", arch, file, short)
    assert f"salman:{short}" in salman.names()


@pytest.mark.parametrize("name,close", [
    ("salman:resnet34_linf_eps4", "salman:resnet50_linf_eps4"),
    ("salman:resnet18_linf_eps3", "salman:resnet18_linf_eps8"),  # L∞ has no 3/255
    ("salman:wide_resnet50_4_linf_eps4", "salman:wide_resnet50_2_linf_eps4"),  # not published
    ("salman:densenet_l2_eps1", "salman:densenet_l2_eps3"),
    ("salman:resnet18_l2_esp3", "salman:resnet18_l2_eps3"),
    ("salman:", None),
    ("salman:resnet18_linf_eps4.5", "salman:resnet18_linf_eps0.5"),
])
def test_unknown_salman_names(name, close):
    with pytest.raises(UserError, match="valid names are") as e:
        W.resolve_source(name)
    msg = str(e.value)
    assert "salman:resnet18_linf_eps4" in msg and "wide_resnet50_4: l2 eps 0, 0.01" in msg and "\n" not in msg
    assert ("did you mean" in msg) == (close is not None)
    if close:
        assert f"(did you mean '{close}'?)" in msg


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
    with pytest.raises(UserError, match="--arch wide_resnet50_2, or leave --arch out"):
        create_model("resnet50", 10, weights="salman:wide_resnet50_2_l2_eps3")
    assert calls == []
    model = create_model("resnet18", 10)
    with pytest.raises(UserError, match="--arch resnet50"):
        W.load_weights(model, "salman:resnet50_linf_eps4")
    # matching arch: downloads into cache_dir (else $AUTOLORA_CACHE) and loads
    info = W.load_weights(model, "salman:resnet18_linf_eps4", cache_dir=str(tmp_path))
    assert calls == [(salman.REPO, "resnet18_linf_eps4.0.ckpt", str(tmp_path))]
    assert info["format"] == "robustness" and info["path"] == str(path)
    assert_backbone_equals(model, plain)
    monkeypatch.setenv("AUTOLORA_CACHE", str(tmp_path / "env"))
    W.resolve_source("salman:resnet50_l2_eps0.25")
    assert calls[-1] == (salman.REPO, "resnet50_l2_eps0.25.ckpt", str(tmp_path / "env"))
    # the arch follows from the weights
    assert create_model(None, 10, weights="salman:resnet18_l2_eps3").arch == "resnet18"
    assert calls[-1][1] == "resnet18_l2_eps3.ckpt"


def test_salman_download_failure(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError) as e:
        W.resolve_source("salman:resnet18_linf_eps8")
    msg = str(e.value)
    assert "failed" in msg and salman.REPO in msg and "resnet18_linf_eps8.0.ckpt" in msg
    assert f"https://huggingface.co/{salman.REPO}/resolve/main/resnet18_linf_eps8.0.ckpt" in msg
    assert "--weights PATH --arch resnet18" in msg and "manually" in msg and "\n" not in msg


def _randn_state_dict(arch):
    """A plain state dict for `arch` with random values, its shapes from a model on the meta device (no init)."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        net = (torchvision.models.resnet50(width_per_group=256) if arch == "wide_resnet50_4"
               else torchvision.models.get_model(arch))
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
            for k, v in net.state_dict().items()}


def test_wide_resnets_are_the_robustness_librarys(monkeypatch):
    """--arch wide_resnet50_4 is the robustness library's wide_resnet50_4 (width_per_group 64 * 4), key for key and
    shape for shape; wide_resnet50_2 too (torchvision's)."""
    pytest.importorskip("robustness", reason="the robustness library is not installed: pip install -e '.[test]'")
    shim = types.ModuleType("torchvision.models.utils")  # robustness imports it from torchvision < 0.13
    shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    monkeypatch.setitem(sys.modules, "torchvision.models.utils", shim)
    from robustness.imagenet_models import resnet as R

    for arch in ("wide_resnet50_2", "wide_resnet50_4"):
        with torch.device("meta"):
            theirs = getattr(R, arch)().state_dict()
            ours = create_model(arch, 10).backbone.state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items() if not k.startswith("fc.")}


def test_wide_resnet_l2_checkpoint_in_the_robustness_layout(tmp_path):
    """wide_resnet50_2_l2_eps3.ckpt as Salman et al. wrote it (module.model.*, the attacker's copy, here sharing the
    model's storage so that the file stays 275 MB, and the normaliser) loads strictly into --arch wide_resnet50_2."""
    plain = _randn_state_dict("wide_resnet50_2")
    path = tmp_path / "wide_resnet50_2_l2_eps3.ckpt"
    ck = robustness_ckpt({})
    ck["model"].update({f"module.{who}.{k}": v for k, v in plain.items() for who in ("model", "attacker.model")})
    torch.save(ck, path)
    model = create_model("wide_resnet50_2", 10)
    info = W.load_weights(model, str(path))
    assert info["format"] == "robustness" and info["num_tensors"] == len(plain) - 2
    assert_backbone_equals(model, plain)


def test_torchvision_archs_of_the_second_table_are_wrapped_once_more(tmp_path):
    """Salman et al.'s mobilenet (and densenet, mnasnet, resnext, shufflenet, vgg) were trained as torchvision models
    inside the library's DummyModel: `module.model.model.*` keys; their head is `classifier.1`."""
    plain = _randn_state_dict("mobilenet_v2")
    torch.save(robustness_ckpt({f"model.{k}": v for k, v in plain.items()}), tmp_path / "mobilenet_l2_eps3.ckpt")
    model = create_model("mobilenet_v2", 10)
    info = W.load_weights(model, str(tmp_path / "mobilenet_l2_eps3.ckpt"))
    assert {"classifier.1.bias", "classifier.1.weight", "normalizer.new_mean"} <= set(info["dropped"])
    assert_backbone_equals(model, plain, head_key="classifier.1")


def fake_salman(monkeypatch, path):
    """`hf_hub_download` returns `path` for any salman: shortcut."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(path))


# -- the allowlist ---------------------------------------------------------------------------------
def numpy1_names(path):
    """Give the numpy scalars of a legacy-format torch file NumPy 1's global name, as NumPy 1 wrote them."""
    data = path.read_bytes()
    old, new = b"numpy._core.multiarray\nscalar\n", b"numpy.core.multiarray\nscalar\n"
    assert old in data or new in data  # protocol 2: GLOBAL opcodes spell the name out, uncompressed
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("numpy1_legacy", [False, True])
def test_numpy_float64_scalars_are_allowlisted(tmp_path, numpy1_legacy):
    plain = plain_tiny()
    path = tmp_path / "np.pt"
    obj = {"state_dict": plain, "lr": np.float64(0.05), "last": [np.float64(0.1)]}
    torch.save(obj, path, _use_new_zipfile_serialization=not numpy1_legacy)
    if numpy1_legacy:
        numpy1_names(path)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):  # torch's defaults alone refuse it
        torch.load(path, weights_only=True)
    got = W._torch_load(str(path), trust_pickle=False)
    assert got["lr"] == 0.05 and type(got["lr"]) is np.float64 and got["last"] == [0.1]
    model = create_model("tiny", 10)
    W.load_weights(model, str(path))
    assert_backbone_equals(model, plain)


def _name(g):
    return f"{g.__module__}.{g.__qualname__}"


@pytest.mark.parametrize("extra,needs", [
    # only float64 is allowlisted, it is all such files hold: a float32 dtype cannot be built
    (np.float32(0.5), [_name(type(np.dtype(np.float32)))]),
    (np.arange(3), [_name(np.arange(1).__reduce__()[0]), "numpy.ndarray"]),
    (fractions.Fraction(1, 3), ["fractions.Fraction"]),
])
def test_anything_else_is_refused_by_name(tmp_path, extra, needs):
    path = tmp_path / "x.pt"
    torch.save({"state_dict": plain_tiny(), "extra": extra}, path)
    with pytest.raises(UserError, match="arbitrary pickled objects") as e:
        W.load_weights(create_model("tiny", 10), str(path))
    msg = str(e.value)
    assert f"objects [{', '.join(needs)}] beyond" in msg  # exactly these: allowlisted ones are not listed
    assert f"autolora convert-weights {path} OUT.safetensors --trust-pickle" in msg and "or pass --trust-pickle" in msg
    assert "\n" not in msg


# -- checkpoints written by the robustness library -------------------------------------------------
ROBUSTNESS_RUNS = {
    # the library's ImageNet defaults: SGD + StepLR; this torch's zip format
    "step_lr": {},
    # `--custom-lr-multiplier` with linear interpolation: a LambdaLR over np.interp, so numpy float64 LRs in the
    # optimizer and schedule state; written like a 2020 file (torch < 1.6 legacy format, NumPy 1 global names)
    "linear_lr_2020": {"custom_lr_multiplier": "[(0, 1), (1, 0.1)]", "lr_interpolation": "linear"},
    # L2 adversarial training, as for Salman et al.'s L2 models (resnet18_l2_eps3.ckpt: eps 3, the library's step)
    "l2_eps3": {"constraint": "2", "eps": "3", "attack_lr": "1.5"},
}
SALMAN_NAME = {"step_lr": "salman:resnet18_linf_eps4", "linear_lr_2020": "salman:resnet18_linf_eps4",
               "l2_eps3": "salman:resnet18_l2_eps3"}


@pytest.fixture(scope="module", params=list(ROBUSTNESS_RUNS))
def robustness_written(request, tmp_path_factory):
    """(checkpoint, the trained ResNet-18's state dict, run name): one epoch of `robustness.train.train_model`
    (PGD training, as for Salman et al.'s models), whose own save path writes `checkpoint.pt.latest` with
    `ch.save(sd_info, path, pickle_module=dill)`: {'model': DataParallel(AttackerModel).state_dict(),
    'optimizer', 'schedule', 'epoch', 'amp', 'adv_prec1'}. The model is `make_and_restore_model(arch='resnet18',
    dataset=ImageNet)`, the library's ImageNet ResNet-18 (torchvision's keys and shapes), and the options are
    main.py's defaults (`check_and_fill_args`) except those set below.

    How it differs from a GPU run of robustness' main.py:
    * no GPU: `Tensor.cuda` / `Module.cuda` are no-ops and `torch.cuda.is_available()` is False during the run,
      so `DataParallel` holds the model without replicas (the same `module.` keys) and the tensors, the 0-d
      `adv_prec1` tensor included (`_model_loop` returns `AverageMeter.avg` of accuracy tensors), are stored
      with location 'cpu' instead of 'cuda:0' (`map_location='cpu'` loads either);
    * `torchvision.models.utils`, from which robustness imports `load_state_dict_from_url` and which
      torchvision 0.13 removed, is aliased to `torch.hub`, where that function lives;
    * 8 random 32x32 images, 1 epoch, 2 PGD steps (not ImageNet, 7 steps); apex is not installed, so 'amp' is
      None as in any run without --mixed-precision;
    * this torch and NumPy write the file; for "linear_lr_2020" the library's `ch.save` writes the legacy
      format (as torch < 1.6 did) and the numpy scalars then get NumPy 1's global name (`numpy1_names`).
    """
    pytest.importorskip("robustness", reason="the robustness library is not installed: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("robustness")
    run = request.param
    with pytest.MonkeyPatch.context() as mp:
        try:
            import torchvision.models.utils  # noqa: F401 (torchvision < 0.13)
        except ImportError:
            shim = types.ModuleType("torchvision.models.utils")
            shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
            mp.setitem(sys.modules, "torchvision.models.utils", shim)
        from cox.utils import Parameters
        from robustness import datasets, defaults, model_utils, train

        mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        mp.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
        mp.setattr(torch.cuda, "is_available", lambda: False)
        if run == "linear_lr_2020":
            mp.setattr(torch, "save", functools.partial(torch.save, _use_new_zipfile_serialization=False))
        args = Parameters({"dataset": "imagenet", "arch": "resnet18", "out_dir": str(out), "adv_train": 1,
                           "epochs": 1, "constraint": "inf", "eps": "4/255", "attack_lr": "1/255", "attack_steps": 2,
                           **ROBUSTNESS_RUNS[run]})
        for arg_list in (defaults.MODEL_LOADER_ARGS, defaults.TRAINING_ARGS, defaults.PGD_ARGS):
            args = defaults.check_and_fill_args(args, arg_list, datasets.ImageNet)
        torch.manual_seed(0)
        model, _ = model_utils.make_and_restore_model(arch=args.arch, dataset=datasets.ImageNet("/unused"))
        g = torch.Generator().manual_seed(0)
        batches = [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 1000, (4,), generator=g)) for _ in range(2)]
        trained = train.train_model(args, model, (batches, batches), store=None)
    path = out / "checkpoint.pt.latest"
    if run == "linear_lr_2020":
        numpy1_names(path)
    return path, {k: v.clone() for k, v in trained.module.model.state_dict().items()}, run


def test_robustness_checkpoint_loads_without_trust_pickle(robustness_written, monkeypatch):
    import torchvision

    path, plain, run = robustness_written
    assert list(plain) == list(torchvision.models.resnet18().state_dict())
    if run != "linear_lr_2020":
        torch.load(path, weights_only=True)  # torch's defaults suffice here
    else:
        with pytest.raises(pickle.UnpicklingError, match="numpy.core.multiarray.scalar"):
            torch.load(path, weights_only=True)
    ck = W._torch_load(str(path), trust_pickle=False)
    assert set(ck) == {"model", "optimizer", "schedule", "epoch", "amp", "adv_prec1"} and ck["epoch"] == 1
    assert ck["adv_prec1"].dim() == 0 and ck["amp"] is None
    assert type(ck["optimizer"]["param_groups"][0]["lr"]) is (float if run != "linear_lr_2020" else np.float64)
    assert {k.split(".")[1] for k in ck["model"]} == {"model", "attacker", "normalizer"}

    # a salman: download goes through the same safe load: weights_only=True, never the pickle fallback
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    fake_salman(monkeypatch, path)
    model = create_model("resnet18", 10)
    info = W.load_weights(model, SALMAN_NAME[run])
    assert loads == [True]
    assert info["format"] == "robustness" and info["num_tensors"] == len(plain) - 2
    assert_backbone_equals(model, plain)  # exactly the trained model's weights, not the attacker copy's


def test_robustness_checkpoint_converts_once(robustness_written, tmp_path, monkeypatch, capsys):
    from autolora.cli import main

    path, plain, run = robustness_written
    fake_salman(monkeypatch, path)
    out = tmp_path / "r18.safetensors"
    assert main(["convert-weights", SALMAN_NAME[run], str(out)]) == 0
    assert "fits arch 'resnet18'" in capsys.readouterr().out
    got = W.read_state_dict(str(out))
    assert sorted(got) == sorted(plain) and all(torch.equal(got[k], plain[k]) for k in plain)  # fc.* kept
    a, b = create_model("resnet18", 10), create_model("resnet18", 10)
    W.load_weights(a, str(path))
    assert W.load_weights(b, str(out))["format"] == "safetensors"
    assert_backbone_equals(b, a.backbone.state_dict())


def test_dill_checkpoint_with_code_is_refused_and_never_run(tmp_path, capsys):
    """A robustness-style checkpoint, pickled by dill, that also holds a function and an object whose
    unpickling runs code (creates a marker file): refused by name by load and convert, the code never runs."""
    from autolora.cli import main

    dill = pytest.importorskip("dill")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    ck = robustness_ckpt(plain_tiny())
    ck.update(lr_func=lambda t: 0.1 * t, payload=Evil(str(marker)))
    torch.save(ck, path, pickle_module=dill)
    needs = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert any(n.startswith("dill.") for n in needs)
    with pytest.raises(UserError, match="arbitrary pickled objects") as e:
        W.load_weights(create_model("tiny", 10), str(path))
    assert all(n in str(e.value) for n in needs)
    out = tmp_path / "evil.safetensors"
    assert main(["convert-weights", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autolora: error: weights file") and "convert-weights" in err and err.count("\n") == 1
    assert not marker.exists() and not out.exists()


# -- convert-weights -------------------------------------------------------------------------------
def test_convert_weights_round_trip(tmp_path, capsys):
    from autolora.cli import main

    plain = plain_tiny()
    src = tmp_path / "robust.ckpt"
    ck = robustness_ckpt(plain)
    ck["optimizer"]["param_groups"][0]["lr"] = np.float64(0.05)  # as robustness' LambdaLR leaves it
    torch.save(ck, src)
    out = tmp_path / "robust.safetensors"
    assert main(["convert-weights", str(src), str(out), "--arch", "tiny"]) == 0
    assert str(out) in capsys.readouterr().out
    got = W.read_state_dict(str(out))
    assert sorted(got) == sorted(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    a, b = create_model("tiny", 10), create_model("tiny", 10)
    assert W.load_weights(a, str(src))["format"] == "robustness"
    assert W.load_weights(b, str(out))["format"] == "safetensors"
    assert_backbone_equals(b, a.backbone.state_dict())
    before = out.read_bytes()
    assert main(["convert-weights", str(src), str(tmp_path / "again.safetensors")]) == 0
    assert (tmp_path / "again.safetensors").read_bytes() == before  # the same input gives the same bytes
    # an existing OUT is only replaced with --overwrite
    other = tmp_path / "other.pth"
    torch.save(plain_tiny(seed=1), other)
    assert main(["convert-weights", str(other), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and out.read_bytes() == before
    assert main(["convert-weights", str(other), str(out), "--overwrite"]) == 0
    assert torch.equal(W.read_state_dict(str(out))["conv1.weight"], plain_tiny(seed=1)["conv1.weight"])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic: no temporary left


def test_convert_weights_trust_pickle(tmp_path, capsys):
    """A trusted file that needs --trust-pickle is converted once; the result loads without it."""
    from autolora.cli import main

    plain = plain_tiny()
    src = tmp_path / "legacy.pt"
    torch.save({"state_dict": plain, "args": fractions.Fraction(1, 3)}, src)
    out = tmp_path / "legacy.safetensors"
    assert main(["convert-weights", str(src), str(out)]) == 2
    assert "fractions.Fraction" in capsys.readouterr().err and not out.exists()
    with pytest.warns(UserWarning, match="arbitrary code"):
        assert main(["convert-weights", str(src), str(out), "--trust-pickle"]) == 0
    model = create_model("tiny", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W.load_weights(model, str(out))
    assert_backbone_equals(model, plain)


@pytest.mark.parametrize("case,expected", [
    ("missing", "not found"),
    ("junk", "cannot read weights file"),
    ("wrong_arch", "do not fit arch 'small'"),
    ("unknown_arch", "unknown arch 'resnet19'"),
    ("salman_arch", "pass --arch resnet18"),
    ("not_safetensors", "must end in .safetensors"),
])
def test_convert_weights_bad_input(tmp_path, capsys, case, expected):
    from autolora.cli import main

    src, out = tmp_path / "w.pth", tmp_path / "w.safetensors"
    if case == "junk":
        src.write_bytes(os.urandom(256))
    elif case != "missing":
        torch.save(plain_tiny(), src)
    argv = {"wrong_arch": ["--arch", "small"], "unknown_arch": ["--arch", "resnet19"]}.get(case, [])
    if case == "salman_arch":
        src, argv = "salman:resnet18_linf_eps4", ["--arch", "resnet50"]  # refused before any download
    if case == "not_safetensors":
        out = tmp_path / "w.pt"
    assert main(["convert-weights", str(src), str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autolora: error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_distilled_deit_tuple_heads_export_load_and_match_plain_timm(tmp_path):
    """timm's distilled DeiT names two classifiers (`head`, `head_dist`): the export writes both (our head's
    weights; timm averages the two heads in eval mode), loads strictly into the plain timm model with the same
    logits, and a plain timm checkpoint loads into our backbone with both heads dropped."""
    import timm

    from autolora.models.export import load_model, save_model
    from autolora.models import create_model

    name = "deit_tiny_distilled_patch16_224"
    torch.manual_seed(0)
    ours = create_model(name, 3, input_size=32).eval()
    assert ours.spec.head_keys == ("head", "head_dist")
    path = str(tmp_path / "model.safetensors")
    save_model(ours, path, {"classes": ["a", "b", "c"]})
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(path)
    assert "head.weight" in sd and "head_dist.weight" in sd and not any("(" in k for k in sd)
    with safe_open(path, framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta["arch"] == name and meta["input_size"] == 32 and meta["classes"] == ["a", "b", "c"]
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3 and meta["resize"] == "nearest"
    plain = timm.create_model(name, pretrained=False, num_classes=3, img_size=32).eval()
    plain.load_state_dict(sd, strict=True)
    x = torch.rand(2, 3, 32, 32)
    norm = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(plain(norm), ours(x), atol=1e-5)
    back, _ = load_model(path)
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), ours(x), atol=1e-6)
    src = timm.create_model(name, pretrained=False, num_classes=1000, img_size=32).state_dict()
    torch.save(src, tmp_path / "timm.pth")
    info = W.load_weights(create_model(name, 5, input_size=32), str(tmp_path / "timm.pth"))
    assert {"head.weight", "head_dist.weight"} <= set(info["dropped"])


def test_exported_resnet_loads_into_plain_torchvision_with_its_metadata(tmp_path):
    """model.safetensors + its metadata (mean, std, input size) reproduce the classifier in plain torchvision."""
    import torchvision

    from autolora.models.export import save_model
    from autolora.models import create_model

    torch.manual_seed(0)
    ours = create_model("resnet18", 4, input_size=64).eval()
    path = str(tmp_path / "model.safetensors")
    save_model(ours, path)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    net = torchvision.models.resnet18(num_classes=meta["num_classes"]).eval()
    net.load_state_dict(load_file(path))
    x = torch.rand(2, 3, 32, 32)
    z = torch.nn.functional.interpolate(x, size=meta["input_size"], mode=meta["resize"])
    z = (z - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(z), ours(x), atol=1e-5)

"""Backbones from every source (issue 24): salman:, robustbench:, timm:, torchvision:, and a module of your own.

Every file is generated here, in the exact layout of its source's cache (the Hugging Face hub cache, RobustBench's
model_dir, torch hub's checkpoints/), and found there by the source's real lookup; nothing is downloaded: the hub is
offline (HF_HUB_OFFLINE=1) and every socket connection fails, so a missing file takes each source's real download
path to its offline error. Each source gets one end-to-end run (1 epoch, tiny, in-process) and its offline error.
"""
import json
import os
import socket

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autolora.config import TrainConfig
from autolora.engine.loop import resume, train
from autolora.errors import UserError
from autolora.models import create_model, sources
from autolora.models import weights as W
from autolora.models.export import load_model, save_model
from autolora.models.sources import robustbench, salman
from helpers import make_imagefolder

HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network (a connection attempt fails at once), and every source's cache in tmp_path."""
    def refuse(*a, **k):
        raise OSError("network disabled in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AUTOLORA_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("AUTOLORA_ROBUSTBENCH_DIR", str(tmp_path / "robustbench"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), classes=3, per_class=6, test_per_class=2, size=16)


def hf_cache_file(cache, repo, filename, write):
    """`write(path)` at the place huggingface_hub's cache keeps `filename` of `repo` (refs/main -> snapshot)."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(HF_COMMIT)
    path = os.path.join(root, "snapshots", HF_COMMIT, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path)
    return path


def run(data, out, weights, **kw):
    """One tiny epoch (PGD-1, clean test evaluation) from `weights`, in this process."""
    cfg = TrainConfig(**{"dataset": "imagefolder", "data_dir": data, "weights": weights, "epochs": 1,
                         "batch_size": 8, "train_steps": 1, "eval_steps": 1, "eval_attacks": ["clean"],
                         "input_size": "32", "device": "cpu", "progress": False, **kw})
    return train(cfg, str(out), quiet=True)


def loaded_line(out):
    return [line for line in open(os.path.join(out, "train.log")) if "backbone tensors from" in line]


def meta_of(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items()}


def resnet18_plain(seed=0):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def assert_loaded(model, plain, prefix=""):
    """Every tensor of `plain` the backbone has (under `prefix`) equals it, and the backbone has almost all of them
    (the source's head is dropped), so a wrong prefix cannot pass by matching nothing."""
    got = model.backbone.state_dict()
    shared = [k for k in plain if prefix + k in got]
    assert len(shared) >= len(plain) - 2, f"only {len(shared)} of {len(plain)} tensors found under {prefix!r}"
    for k in shared:
        assert torch.equal(got[prefix + k], plain[k]), k


# -- salman: ------------------------------------------------------------------------------------------
def salman_ckpt(plain):
    """A robustness-library checkpoint as Salman et al.'s files hold it."""
    sd = {f"module.{who}.{k}": v for k, v in plain.items() for who in ("model", "attacker.model")}
    sd.update({"module.normalizer.new_mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
               "module.normalizer.new_std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)})
    return {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "schedule": None, "epoch": 90}


def test_salman_l2_end_to_end_from_the_hub_cache(data, tmp_path):
    plain = resnet18_plain()
    hf_cache_file(tmp_path / "hf", salman.REPO, "resnet18_l2_eps3.ckpt", lambda p: torch.save(salman_ckpt(plain), p))
    res = run(data, tmp_path / "run", "salman:resnet18_l2_eps3")
    assert res["arch"] == "resnet18" and res["epochs_run"] == 1  # the arch follows from the weights
    assert "loaded 120 backbone tensors from salman:resnet18_l2_eps3 (robustness)" in "".join(loaded_line(tmp_path / "run"))
    model = create_model(None, 3, 32, weights="salman:resnet18_l2_eps3")  # the real hf_hub_download, offline
    assert_loaded(model, plain)


# -- robustbench: -------------------------------------------------------------------------------------
def rb_file(tmp_path, name, sd, dataset="imagenet", threat="Linf"):
    path = tmp_path / "robustbench" / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def test_robustbench_end_to_end_keeps_its_normalisation_and_the_lora_branch_covers_it(data, tmp_path):
    plain = resnet18_plain()
    rb_file(tmp_path, "Salman2020Do_R18", {"state_dict": {"module." + k: v for k, v in plain.items()}})
    weights = "robustbench:imagenet/Linf/Salman2020Do_R18"
    res = run(data, tmp_path / "run", weights, method="autolora")
    assert res["arch"] == weights and res["lora_params"] > 0
    assert f"loaded 122 backbone tensors from {weights} (torch)" in "".join(loaded_line(tmp_path / "run"))
    meta = meta_of(tmp_path / "run" / "model.safetensors")
    assert (meta["family"], meta["arch"], meta["head_keys"]) == ("robustbench", "imagenet/Linf/Salman2020Do_R18",
                                                                 ["model.fc"])
    assert meta["mean"] == [0.0, 0.0, 0.0] and meta["std"] == [1.0, 1.0, 1.0]  # the zoo model normalises itself

    model = create_model(None, 3, 32, weights=weights)
    assert_loaded(model, plain, prefix="model.")
    assert torch.allclose(model.backbone.normalize.mean.flatten(), torch.tensor(robustbench.MU))
    from autolora.methods.lora import lora_targets

    targets = lora_targets(model.backbone)
    assert "model.conv1" in targets and "model.layer4.1.conv2" in targets and not any("fc" in t for t in targets)
    x = torch.rand(2, 3, 32, 32)  # normalised once: by the zoo's normalize module, not again by our preprocess
    zoo = robustbench.zoo_model("imagenet/Linf/Salman2020Do_R18")[0].eval()
    zoo.model.fc = nn.Identity()
    zoo.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        assert torch.allclose(model.eval().features(x), zoo(x), atol=1e-5)
    # the export is the zoo model's own state dict (with our head): RobustBench's architecture loads it strictly
    loaded, _ = load_model(str(tmp_path / "run" / "model.safetensors"))
    zoo = robustbench.zoo_model("imagenet/Linf/Salman2020Do_R18")[0]
    zoo.model.fc = nn.Linear(512, 3)
    zoo.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    with torch.no_grad():
        assert torch.allclose(zoo.eval()(nn.functional.interpolate(x, size=32)), loaded.eval()(x), atol=1e-5)


def swin_old_layout(sd):
    """A timm Swin state dict in the layout of the original Swin code (RobustBench's Liu2023 files): downsampling
    at the end of a stage, the classifier `head`, the relative position index stored."""
    import re

    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers.(\d+).downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_robustbench_swin_in_the_original_layout(tmp_path):
    """Liu et al.'s Swin-B file in the original Swin layout: converted by timm's filter, as robustbench does."""
    import timm

    torch.manual_seed(0)
    plain = timm.create_model("swin_base_patch4_window7_224").state_dict()
    rb_file(tmp_path, "Liu2023Comprehensive_Swin-B", {"model." + k: v for k, v in swin_old_layout(plain).items()})
    model = create_model(None, 10, weights="robustbench:imagenet/Linf/Liu2023Comprehensive_Swin-B")
    assert model.input_size == 224 and model.spec.head_keys == ("model.head.fc",)
    assert_loaded(model, plain, prefix="model.")
    with pytest.raises(UserError, match="takes 224x224 inputs .* not --input-size 64: pass --input-size 224"):
        create_model("robustbench:imagenet/Linf/Liu2023Comprehensive_Swin-B", 10, 64)


@pytest.mark.parametrize("name,expected", [
    ("imagenet/Linf/Salman2020Do_R1", "(did you mean 'Salman2020Do_R18'?)"),
    ("imagenett/Linf/Salman2020Do_R18", "unknown dataset 'imagenett' (did you mean 'imagenet'?)"),
    ("imagenet/Salman2020Do_R18", "is not robustbench:DATASET/THREAT/NAME"),
])
def test_robustbench_wrong_names(name, expected):
    with pytest.raises(UserError) as e:
        sources.parse("robustbench:" + name)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_robustbench_with_the_package_loads_what_robustbench_loads(tmp_path):
    """Where the robustbench package is installed (extra `robustbench`): its zoo is used, and its own
    `load_model` on the same file gives the weights ours does."""
    pytest.importorskip("robustbench")
    from robustbench.utils import load_model as rb_load_model

    plain = resnet18_plain()
    path = rb_file(tmp_path, "Salman2020Do_R18", {"module." + k: v for k, v in plain.items()})
    written = path.stat().st_mtime_ns
    assert robustbench._package() is not None
    model = create_model(None, 10, weights="robustbench:imagenet/Linf/Salman2020Do_R18")
    theirs = rb_load_model("Salman2020Do_R18", model_dir=str(tmp_path / "robustbench"), dataset="imagenet",
                           threat_model="Linf")
    ours = model.backbone.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items() if not k.startswith("model.fc."))
    assert path.stat().st_mtime_ns == written  # both read the file we wrote: neither fetched another


# -- timm: --------------------------------------------------------------------------------------------
def vit_plain(tag="vit_tiny_patch16_224.augreg_in21k"):
    import timm

    torch.manual_seed(0)
    return timm.create_model(tag, pretrained=False).state_dict()  # with the tag's head (21843 classes)


def test_timm_end_to_end_from_the_hub_cache(data, tmp_path):
    """timm:NAME.TAG from the tag's Hugging Face repo (hub cache, offline), at input 32: timm's filter resamples the
    position embeddings to the 2x2 patch grid; the classifier takes the tag's mean and std (0.5, augreg)."""
    plain = vit_plain()
    hf_cache_file(tmp_path / "hf", "timm/vit_tiny_patch16_224.augreg_in21k", "model.safetensors",
                  lambda p: save_file(plain, p))
    res = run(data, tmp_path / "run", "timm:vit_tiny_patch16_224.augreg_in21k", method="autolora")
    assert res["arch"] == "vit_tiny_patch16_224" and res["lora_params"] > 0
    assert loaded_line(tmp_path / "run")
    meta = meta_of(tmp_path / "run" / "model.safetensors")
    assert meta["img_size"] == 32 and meta["mean"] == [0.5, 0.5, 0.5]
    model = create_model(None, 3, 32, weights="timm:vit_tiny_patch16_224.augreg_in21k")
    assert model.backbone.pos_embed.shape == (1, 5, 192)
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, plain["blocks.0.attn.qkv.weight"])


def test_timm_with_a_local_file_overlay(tmp_path):
    """`pretrained_cfg_overlay=dict(file=...)`: the file, read by our loader (a training checkpoint's state_dict
    with a `module.` prefix), given to timm's pretrained path; a file that does not fit is one error."""
    plain = vit_plain("vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in plain.items()}, "epoch": 3}, path)
    model = create_model("vit_tiny_patch16_224", 10, 64)
    info = W.load_weights(model, "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                          pretrained_cfg_overlay=dict(file=str(path)))
    assert info["path"] == str(path) and info["num_tensors"] == len(plain) - 2
    assert torch.equal(model.backbone.patch_embed.proj.weight, plain["patch_embed.proj.weight"])
    torch.save({k: v for k, v in plain.items() if k != "norm.weight"}, path)
    with pytest.raises(UserError, match="do not fit timm's vit_tiny_patch16_224.augreg_in21k_ft_in1k.*norm.weight"):
        W.load_weights(model, "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                       pretrained_cfg_overlay=dict(file=str(path)))


def test_timm_names():
    ref = sources.parse("timm:vit_base_patch16_224")  # no tag: timm's default one
    assert ref.name == "vit_base_patch16_224.augreg2_in21k_ft_in1k" and ref.arch == "vit_base_patch16_224"
    assert sources.parse("timm:resnet50.a1_in1k").arch == "timm:resnet50"  # --arch resnet50 is torchvision's
    with pytest.raises(UserError, match=r"\(did you mean 'vit_tiny_patch16_224.augreg_in21k'\?\)"):
        sources.parse("timm:vit_tiny_patch16_224.augreg_in22k")
    with pytest.raises(UserError, match=r"timm has no model 'vit_tiny_patch16_225' \(did you mean"):
        sources.parse("timm:vit_tiny_patch16_225.augreg_in21k")
    # a pretrained tag in --arch loads nothing: refused, naming --weights timm:
    with pytest.raises(UserError, match="pass --weights timm:vit_tiny_patch16_224.augreg_in21k"):
        create_model("vit_tiny_patch16_224.augreg_in21k", 10)


# -- torchvision: -------------------------------------------------------------------------------------
def test_torchvision_end_to_end_from_the_torch_hub_cache(data, tmp_path):
    plain = resnet18_plain()
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(plain, path)
    res = run(data, tmp_path / "run", "torchvision:resnet18.IMAGENET1K_V1")
    assert res["arch"] == "resnet18"
    assert "from torchvision:resnet18.IMAGENET1K_V1 (torch)" in "".join(loaded_line(tmp_path / "run"))
    model = create_model(None, 3, 32, weights="torchvision:resnet18.DEFAULT")
    assert_loaded(model, plain)
    # read by our loader (weights_only=True), not by load_state_dict_from_url (weights_only=False)
    torch.save({**plain, "extra": __import__("fractions").Fraction(1, 3)}, path)
    with pytest.raises(UserError, match=r"arbitrary pickled objects \[fractions.Fraction\]"):
        create_model(None, 3, 32, weights="torchvision:resnet18.IMAGENET1K_V1")


def test_torchvision_names():
    assert sources.parse("torchvision:resnet50").name == "resnet50.IMAGENET1K_V2"  # the enum's DEFAULT
    assert sources.parse("torchvision:efficientnet_b0.IMAGENET1K_V1").arch == "torchvision:efficientnet_b0"
    with pytest.raises(UserError, match=r"\(did you mean 'IMAGENET1K_V2'\?\): resnet50's weights are"):
        sources.parse("torchvision:resnet50.IMAGENET1K_V3")
    with pytest.raises(UserError, match=r"no classification model 'resnet51' \(did you mean 'resnet50'\?\)"):
        sources.parse("torchvision:resnet51.IMAGENET1K_V1")


# -- offline: one line naming the file to fetch and where to put it -------------------------------------
@pytest.mark.parametrize("weights,expected", [
    ("salman:resnet50_l2_eps3", ["https://huggingface.co/madrylab/robust-imagenet-models/resolve/main/"
                                 "resnet50_l2_eps3.ckpt", "--weights PATH --arch resnet50", "HFCACHE"]),
    ("timm:vit_tiny_patch16_224.augreg_in21k", ["https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k/"
                                                "resolve/main/model.safetensors", "hf download", "HFCACHE"]),
    ("torchvision:resnet18.IMAGENET1K_V1", ["https://download.pytorch.org/models/resnet18-f37072fd.pth",
                                            "put it at TMP/torch/hub/checkpoints/resnet18-f37072fd.pth"]),
    ("robustbench:imagenet/Linf/Salman2020Do_R50", ["https://drive.google.com/uc?id=1TmT5oGa1UvVjM3d-XeSj_XmKqBNRUg8r",
                                                    "save it as TMP/robustbench/imagenet/Linf/Salman2020Do_R50.pt"]),
])
def test_offline_each_source_names_the_file_and_where_it_goes(data, tmp_path, capsys, weights, expected):
    from autolora.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", data, "--weights", weights, "--epochs", "1",
                 "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autolora: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in expected:
        assert part.replace("TMP", str(tmp_path)).replace("HFCACHE", str(tmp_path / "hf")) in err, (part, err)
    assert not out.exists()  # checked before the run directory was touched


def test_weights_that_imply_another_arch_are_refused_before_any_download(tmp_path, capsys):
    from autolora.cli import main

    assert main(["train", "--arch", "resnet50", "--weights", "salman:resnet18_l2_eps3", "--dataset", "imagefolder",
                 "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "are for arch 'resnet18' but --arch is 'resnet50'" in err and "leave --arch out" in err


def test_help_lists_every_source_with_an_example(capsys):
    from autolora.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for example in sources.examples():
        assert example in text, example
    assert "none (train from random weights" in text


# -- ViT position embeddings at another input size ------------------------------------------------------
def test_vit_position_embeddings_are_resampled_and_img_size_is_exported(tmp_path, caplog):
    """224-input ViT weights in a ViT built for 64 (4x4 patches): pos_embed (1, 197, 192) -> (1, 17, 192) with
    timm's resample_abs_pos_embed, logged; model.safetensors records img_size, so plain timm rebuilds it."""
    import timm
    from timm.layers import resample_abs_pos_embed

    plain = vit_plain("vit_tiny_patch16_224")
    save_file(plain, tmp_path / "vit.safetensors")
    model = create_model("vit_tiny_patch16_224", 4, 64)
    with caplog.at_level("INFO", logger="autolora"):
        W.load_weights(model, str(tmp_path / "vit.safetensors"))
    assert "pos_embed (1, 197, 192) resampled to (1, 17, 192) for a 4x4 patch grid" in caplog.text
    assert torch.equal(model.backbone.pos_embed, resample_abs_pos_embed(plain["pos_embed"], new_size=[4, 4]))
    path = str(tmp_path / "model.safetensors")
    save_model(model.eval(), path)
    meta = meta_of(path)
    assert meta["img_size"] == 64
    # the README's plain-timm recipe
    net = timm.create_model(meta["arch"], num_classes=meta["num_classes"], img_size=meta["img_size"]).eval()
    net.load_state_dict(load_file(path))
    x = torch.rand(2, 3, 32, 32)
    z = nn.functional.interpolate(x, size=meta["input_size"], mode=meta["resize"])
    z = (z - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(z), model(x), atol=1e-5)


# -- a module of your own -----------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """A hand-written classifier: two conv blocks, then `classifier` (flatten + linear)."""

    def __init__(self, num_classes=7):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_own_module_fine_tunes_end_to_end(data, tmp_path):
    from autolora import evaluate_run
    from autolora.methods.lora import lora_targets

    torch.manual_seed(0)
    mine = SmallCNN()
    model = create_model(mine, 3, "none", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert model.spec.head_keys == ("classifier.1",) and model.spec.num_features == 16
    assert lora_targets(model.backbone) == ["features.0", "features.3"]  # its Conv2d layers; the head is ours
    assert torch.equal(model.backbone.features[0].weight, mine.features[0].weight)  # its own weights, copied
    assert isinstance(mine.classifier[1], nn.Linear)  # the object given is left as it was

    cfg = TrainConfig(method="autolora", dataset="imagefolder", data_dir=data, epochs=1, batch_size=8, train_steps=1,
                      eval_steps=1, eval_attacks=["clean"], device="cpu", progress=False)
    res = train(cfg, str(tmp_path / "run"), quiet=True, model=model)
    arch = f"module:{SmallCNN.__module__}.SmallCNN"
    assert res["arch"] == arch and res["lora_params"] > 0 and res["epochs_run"] == 1
    assert f"arch: {arch}" in open(tmp_path / "run" / "config.yaml").read()
    assert "no --weights" not in open(tmp_path / "run" / "train.log").read()  # it brings its weights

    path = str(tmp_path / "run" / "model.safetensors")
    meta = meta_of(path)
    assert (meta["family"], meta["head_keys"], meta["mean"]) == ("module", ["classifier.1"], [0.5, 0.5, 0.5])
    with pytest.raises(UserError, match="load_model\\(path, model=<a fresh instance"):
        load_model(path)
    loaded, _ = load_model(path, model=SmallCNN())
    plain = SmallCNN(num_classes=3).eval()  # the export is the class's own state dict, with a 3-class head
    plain.load_state_dict(load_file(path))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain((x - 0.5) / 0.25), loaded.eval()(x), atol=1e-5)
    assert evaluate_run(str(tmp_path / "run"), model=SmallCNN(), write=False)["test_sa"] == res["test_sa"]
    with pytest.raises(UserError, match="a model of your own"):
        evaluate_run(str(tmp_path / "run"), write=False)
    # resuming needs the module again; the checkpoint gives its weights
    os.remove(tmp_path / "run" / "results.json")
    with pytest.raises(UserError, match=r"resume\(out, model=create_model\(module"):
        resume(str(tmp_path / "run"), quiet=True)
    again = create_model(SmallCNN(), 3, "none", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert resume(str(tmp_path / "run"), quiet=True, model=again)["test_sa"] == res["test_sa"]


def test_own_module_needs_declared_normalisation_and_a_head():
    with pytest.raises(UserError, match="declare the input normalisation"):
        create_model(SmallCNN(), 3)
    with pytest.raises(UserError, match="no module 'head'"):
        create_model(SmallCNN(), 3, head="head", mean=None, std=None)
    assert create_model(SmallCNN(), 3, head="classifier.1", mean=None, std=None).spec.mean == (0.0, 0.0, 0.0)
    with pytest.raises(UserError, match="no classification head found"):
        create_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 3, mean=None, std=None)


# -- RoLI's backbone, end to end ------------------------------------------------------------------------
@pytest.mark.slow
def test_roli_on_liu2023_convnext_b_without_weights(tmp_path):
    """The robust ConvNeXt-B of Liu et al. (2023), a backbone RoLI fine-tunes: RobustBench's architecture, built
    without its weights, at 32x32 input, through RoLI's two stages (adversarial linear probing, then Madry
    fine-tuning of every layer) in a real process."""
    from helpers import FAST_ARGS, read_json, run_cli

    data = make_imagefolder(tmp_path / "data", classes=3, per_class=6, test_per_class=2, size=16)
    arch = "robustbench:imagenet/Linf/Liu2023Comprehensive_ConvNeXt-B"
    args = [a for a in FAST_ARGS if a not in ("--arch", "tiny", "--input-size", "none")]
    run_cli("train", *args, "--arch", arch, "--weights", "none", "--input-size", "32", "--method", "roli",
            "--epochs", "1", "--data-dir", data, "--out", tmp_path / "run")
    res = read_json(tmp_path / "run" / "results.json")
    assert res["arch"] == arch and [s["stage"] for s in res["stages"]] == ["probe", "main"]
    assert res["backbone_params"] > 87_000_000 and res["trainable_params"] > res["backbone_params"]
    meta = meta_of(tmp_path / "run" / "model.safetensors")
    assert meta["head_keys"] == ["model.head.fc"] and meta["input_size"] == 32

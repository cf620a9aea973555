"""`autolora convert-weights IN OUT.safetensors`: convert a pickled checkpoint, once, into a safe file to share."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("convert-weights", help="write a checkpoint as .safetensors (plain layout) for --weights",
                       description="Read IN like `--weights` does and write the model's tensors to OUT.safetensors "
                                   "in the plain torchvision/timm layout, its classification head included "
                                   "(--weights drops it); optimizer/schedule state and the robustness library's "
                                   "attacker copy and normaliser are left out. OUT loads without unpickling, so "
                                   "convert a file that needs --trust-pickle once, on a machine where you trust "
                                   "it, and share OUT.")
    p.add_argument("source", metavar="IN", help="weights file (.pth/.pt/.ckpt/.bin/.safetensors) or a source as --weights takes it "
                                                 "(salman:resnet50_l2_eps3, robustbench:..., timm:..., torchvision:...)")
    p.add_argument("out", metavar="OUT.safetensors", help="file to write (atomically; never silently replaced)")
    p.add_argument("--arch", default=None, help="check that the weights fit this backbone strictly before writing "
                                                "(implied by a source)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle IN with weights_only=False (it can run code in the file): only for a file you trust")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def run(args) -> int:
    from ..models.weights import convert_weights

    info = convert_weights(args.source, args.out, arch=args.arch, trust_pickle=args.trust_pickle,
                           overwrite=args.overwrite)
    checked = f", fits arch '{info['arch']}'" if info["arch"] else ""
    print(f"wrote {info['out']}: {info['num_tensors']} tensors from {info['format']} file {info['path']}{checked}; "
          f"left out {len(info['dropped'])} keys")
    return 0

"""autolora: automated robust fine-tuning (AutoLoRa, Xu et al., ICLR 2024) and its baselines.

Python API (the CLI is a thin layer over these):
    create_model(arch, num_classes, input_size, weights=...)  -> Classifier (pixel inputs in [0, 1]); arch may be a
                                                     module of your own (with mean=, std=, head=)
    load_weights(model, source)                      -> loads pretrained backbone weights (a file or a source:
                                                     salman:, robustbench:, timm:, torchvision:)
    load_model(path)                                 -> (model in eval mode, metadata) of a model.safetensors
    build_data(dataset, data_dir, ...)               -> DataBundle(train, val, test, classes)
    TrainConfig(...), train(cfg, out, model=None)    -> trains into a run directory, returns results
    preset_config("roli", dataset=...)               -> a TrainConfig with the authors' settings (roli, twins-authors)
    resume(out, model=None)                          -> continues a run from its last checkpoint
    evaluate(model, x, y, attacks=[...], norm=...)   -> accuracies (clean, PGD-k, AutoAttack), L∞ or L2
    evaluate_run(run_dir, eps=[...], ...)            -> re-evaluates a finished run
    attacks.PGD(model, eps, step_size, steps, norm)  -> a standalone attack: x_adv = atk(x, y)
"""
__version__ = "0.1.0"

_WHERE = {
    "create_model": "models", "Classifier": "models", "load_weights": "models.weights", "build_data": "data",
    "TrainConfig": "config", "train": "engine.loop", "evaluate_run": "workflows.evaluate", "evaluate": "eval",
    "PGD": "attacks", "AutoAttack": "attacks", "UserError": "errors", "load_model": "models.export",
    "save_model": "models.export", "pretrain": "workflows.pretrain", "compare": "workflows.compare",
    "write_report": "workflows.report", "convert_weights": "models.weights", "resume": "engine.loop",
    "preset_config": "methods", "resolve_config": "methods",
}
_SUBMODULES = ("attacks",)
__all__ = sorted([*_WHERE, *_SUBMODULES])


def __getattr__(name):  # lazy: `import autolora` stays cheap
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"autolora.{name}")
    if name in _WHERE:
        return getattr(importlib.import_module(f"autolora.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'autolora' has no attribute '{name}'")


def __dir__():
    return sorted({*globals(), *__all__})

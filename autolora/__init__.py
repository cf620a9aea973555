"""autolora: automated robust fine-tuning (AutoLoRa, Xu et al., ICLR 2024) and its baselines.

Python API (the CLI is a thin layer over these):
    create_model(arch, num_classes, input_size, weights=...)  -> Classifier (pixel inputs in [0, 1]); arch may be a
                                                     module of your own (with mean=, std=, head=)
    load_weights(model, source)                      -> loads pretrained backbone weights (a file or a source:
                                                     salman:, robustbench:, timm:, torchvision:)
    build_data(dataset, data_dir, ...)               -> DataBundle(train, val, test, classes)
    TrainConfig(...), train(cfg, out, model=None)    -> trains into a run directory, returns results
    resume(out, model=None)                          -> continues a run from its last checkpoint
    evaluate(model, data, attacks=[...])             -> accuracies (clean, PGD-k, AutoAttack)
    evaluate_run(run_dir)                            -> re-evaluates a finished run
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import autolora` stays cheap
    import importlib

    where = {
        "create_model": "models", "Classifier": "models", "load_weights": "models.weights", "build_data": "data",
        "TrainConfig": "config", "train": "engine.loop", "resume": "engine.loop", "evaluate_run": "workflows.evaluate",
        "evaluate": "eval",
        "PGD": "attacks", "UserError": "errors", "load_model": "models.export", "save_model": "models.export",
        "pretrain": "workflows.pretrain", "compare": "workflows.compare", "write_report": "workflows.report",
        "convert_weights": "models.weights", "preset_config": "methods", "resolve_config": "methods",
    }
    if name in where:
        return getattr(importlib.import_module(f"autolora.{where[name]}"), name)
    raise AttributeError(name)

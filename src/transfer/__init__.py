"""transfer: reproducible transfer learning for image classification.

The packages follow the data, which flows one way (raw -> manifests -> features -> model -> metrics):

    data/       fetch (downloads, archives), sources (the five kinds of data.source and `materialise`),
                scan (folders, labels CSVs, checking every image, duplicates), place (files under data/raw),
                images (decoding), report (the data report and policy), split (stratified manifests),
                config (DataConfig: a backbone's preprocessing), datasets and transforms
    features    pooled features of a frozen backbone, cached per split
    models/     backbones (registry, weights, data config), groups (layer groups: derived, frozen, a
                model's groups in order, per-group weight change and gradient norms), heads (linear and
                scikit-learn), saved (the model folder), registry (`transfer promote`), export (ONNX)
    train/      probe, finetune, result (model selection), optim (parameter groups, schedule), losses,
                checkpoint, lr_find, tune (Optuna), recipe
    evaluate/   metrics, health (fit verdict, feature health, problems and advice), plots, diagnostics (a run's
                folder and report), report (the HTML page), inference, predict, compare, pr_report
    tracking    everything MLflow (the only module that imports it)
    cli         the `transfer` command: predict, promote, export, compare, report, tune, lr-find
    pipeline/   the plumbing apart from the science: params (the schema) and params_doc, layout (file
                paths), files (atomic writes, safe loads), errors (and logging setup), runtime (device,
                threads, seeds), distributed (torchrun relaunch, process groups, shards), and the stage
                launcher/server behind every dvc.yaml command
"""

__version__ = "0.1.0"

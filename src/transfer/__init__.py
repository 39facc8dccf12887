"""transfer: reproducible transfer learning for image classification.

The packages follow the data, which flows one way (raw -> manifests -> features -> model -> metrics):

    data/       sources and archives (fetch, sources), image decoding (images), the data report,
                the stratified split and manifests (split), datasets and transforms
    features    pooled features of a frozen backbone, cached per split
    models/     backbones (registry, layer groups, data config) and classifier heads
    train/      the linear probe, fine-tuning, optimiser groups, checkpoints, data parallelism
    evaluate/   test metrics, diagnostics pictures and the HTML run report
    tracking    everything MLflow (the only module that imports it)
    pipeline/   the plumbing apart from the science: params schema, file layout, atomic files, errors,
                runtime (device, threads, seeds), and the stage launcher/server behind every dvc.yaml command
"""

__version__ = "0.1.0"

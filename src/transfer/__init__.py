"""transfer: reproducible transfer learning for image classification.

Library modules, by concept:
    params      the params.yaml schema and loader (one source of truth for every knob)
    files       atomic writes and small file formats (JSON, CSV)
    fetch       download, checksum and unpack archives
    images      decode any image file into RGB
    data        index, stratified split, manifests, datasets
    backbones   registry: backbone name -> builder, pretrained weights, layer groups, data config
    features    pooled features of a frozen backbone, cached per split
    training    linear probe on cached features, fine-tuning with frozen layer groups
    evaluation  test metrics and confusion matrix
    tracking    everything MLflow (the only module that imports it)
    stage_server  runs stage scripts in forks of a process that has the heavy libraries imported
                  (`python -m transfer.stage stages/<name>.py` is every dvc.yaml command)
"""

__version__ = "0.1.0"

"""One rank of the DDP test (torchrun, from tests/integration/test_finetune_torchrun.py): fine-tune, rank 0 saves."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_helpers import params, tiny_classifier, tiny_dataset  # noqa: E402

from transfer.pipeline.distributed import init_from_env, shutdown  # noqa: E402
from transfer.train.finetune import fine_tune  # noqa: E402

RECIPE = dict(epochs=2, batch_size=8, unfreeze_every=1, hflip=0.0)


def run(context=None):
    """The same fine-tuning in one process (context None) or in each rank."""
    from transfer.pipeline.distributed import SINGLE

    model = tiny_classifier(batch_norm=False)
    return fine_tune(
        model,
        2,
        tiny_dataset(),
        tiny_dataset(seed=1),
        params(**RECIPE),
        0,
        torch.device("cpu"),
        context=context or SINGLE,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    context = init_from_env("cpu")
    result = run(context)
    if context.is_main:
        torch.save(
            {"state_dict": result.model.state_dict(), "history": result.history, "world_size": context.world_size},
            sys.argv[1],
        )
    shutdown(context)

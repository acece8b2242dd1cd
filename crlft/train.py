"""The entry every rank runs: ``python -m crlft.train RECIPE.yaml [section.key=value ...]`` (= ``crlft train``).

Under the DeepSpeed launcher (one process per GPU, or per CPU rank; ``--hostfile`` for many nodes)::

    deepspeed --num_gpus 8 --module crlft.train recipes/openchat_3.5.yaml train.lr=1e-5

(DeepSpeed's runner spells the module flag ``--module``; ``launch.sh`` wraps all of this and runs ``crlft prepare``
first.) The arguments are parsed by :func:`crlft.cli.train_main`.
"""

import sys

from crlft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

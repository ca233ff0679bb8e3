import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.evaluate import run_evaluation  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

with logged(snakemake.log[0]) as log:
    inputs = {
        name: getattr(snakemake.input, name) for name in ("index", "split", "model", "history")
    }
    names = ("metrics", "confusion", "confusion_png", "per_class", "curves", "predictions")
    outputs = {name: getattr(snakemake.output, name) for name in names}
    run_evaluation(inputs, outputs)

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

import yaml  # noqa: E402

from imgpipe.experiment import write_csv  # noqa: E402
from imgpipe.logs import logged  # noqa: E402
from imgpipe.sweep import best_config, collect_trials, plot_trials  # noqa: E402

with logged(snakemake.log[0]) as log:
    monitor = snakemake.params.monitor
    summaries = [json.loads(Path(path).read_text()) for path in snakemake.input]
    trials = collect_trials(summaries, monitor)
    write_csv(trials, snakemake.output.trials)
    best = best_config(trials, monitor)
    tmp = Path(snakemake.output.best).with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(best, sort_keys=True))
    tmp.replace(snakemake.output.best)
    plot_trials(trials, monitor, snakemake.output.plot)
    log.info("best trial %s: %s = %.4f", best["trial"], monitor, best["score"])

"""What the Space (space/app.py) does besides drawing the page, kept free of gradio so it is
tested on its own. The Space is a thin layer over hubmerge's Python API, like the CLI:

- `policy`: whether strangers use this process (`shared_space`), and then what it accepts (Hub
  models and datasets only, no token the visitor did not give) and the budget of each job.
- `preview`: the layer map of the methods that plan from `config.json` files alone, before any
  weights are downloaded; `disk`: the weights to download plus the output must fit.
- `jobs`: `check` (a config and its models' configs validated) and `MergeJob` (one merge), each
  in a forked `Budgeted` process with its own time and memory budget; merges take turns.
- `results`: the card and the files a page shows of a merged model.
- `form`: the form's fields per method, and the YAML they write and are filled from.
- `handlers`: what the page's buttons do (validate, merge, publish), answered as Markdown.

Every untrusted input is bounded before it costs anything (`hubmerge.limits`); a request that
still goes wrong is stopped alone, and the others' jobs keep running.
"""

from hubmerge.space.jobs import Budgeted, Checked, MergeJob, check, discard
from hubmerge.space.policy import SPACE_ENV, read_config_text, refuse_implicit_token, shared_space

__all__ = [
    "SPACE_ENV",
    "Budgeted",
    "Checked",
    "MergeJob",
    "check",
    "discard",
    "read_config_text",
    "refuse_implicit_token",
    "shared_space",
]

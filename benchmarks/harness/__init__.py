"""The benchmarks' shared harness: what the scripts in ``benchmarks/`` import, so that each script
reads top to bottom as its experiment.

``benchmarks/common.py`` is its base (devices, timing, the Llama shapes, JSON / markdown writing, the
scripts' common options). The modules here own one concern each:

- ``race_modes``: the race's modes (full, random, the CGGR configurations) and the compiled step each runs.
- ``training``: one run of a mode for a wall-clock budget, held-out evaluation, the learnability probe.
- ``references``: the models a race starts from or compares against (base model, RHO-LOSS reference,
  the pretrained SmolLM2) and their caches.
- ``race_data``: the race's stream: corpus, replay mix, noise mix, the fixed held-out set.
- ``race_report``: the race's table, plot, merged reports and the quality summary.
- ``step_timing``: the speed benchmark's modes, isolated timing under CUDA graphs, sync and compile checks.
- ``speed_report``: the speed benchmark's derived ratios, markdown, plot and merge.
"""

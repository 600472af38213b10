"""The benchmarks' shared harness: what the scripts in ``benchmarks/`` import, so that each script
reads top to bottom as its experiment.

``benchmarks/common.py`` is its base (devices, timing, the Llama shapes, JSON / markdown writing, the
options the timing scripts share); ``benchmarks/corpus.py`` reads the machine's files into a corpus
and ``benchmarks/pretrained.py`` loads SmolLM2 from its GGUF. The modules here own one concern each:

- ``race_options``: the race's presets and command line, and what they resolve to on the device.
- ``race_data``: the race's stream: corpus, replay mix, noise mix, the fixed held-out set.
- ``noise``: the noisy regimes' rows (unlearnable; what a scraper would keep), from this machine's files.
- ``race_modes``: the race's modes (full, random, the CGGR configurations) and the compiled step each runs.
- ``training``: one run of a mode for a wall-clock budget, the sweep over learning rates and seeds,
  held-out evaluation.
- ``references``: the models a race starts from or measures against (pretrained, base, RHO-LOSS
  reference) and their caches.
- ``race_report``: the race's table, plot, merged reports and the quality summary.
- ``stats``: rank correlation, checkpoint noise, the learnability probe.
- ``step_timing``: the speed benchmark's modes, isolated timing under CUDA graphs, sync and compile checks.
- ``speed_report``: the speed benchmark's derived ratios, markdown, plot and merge.
"""

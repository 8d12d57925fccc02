"""Test and benchmark support: nothing here is part of the runtime API.

One module per idea:

* :mod:`~eplb_triton.testing.launch`: ``run_ranks``, N local ranks in one process group;
* :mod:`~eplb_triton.testing.synthetic`: expert weights whose bytes name their expert, and
  the bit-exact checker ``row_mismatches``;
* :mod:`~eplb_triton.testing.balancer`: an EPLB-style placement generator;
* :mod:`~eplb_triton.testing.shapes`: the one table of model shapes (presets and reference layers);
* :mod:`~eplb_triton.testing.baseline`: the per-expert baseline (vLLM's wire scheme);
* :mod:`~eplb_triton.testing.benchmark`: the end-to-end benchmark behind ``eplb-triton bench``;
* :mod:`~eplb_triton.testing.machine`: the ``Machine:`` line of every benchmark.

They live inside the package (not in bench/) because the installed ``eplb-triton demo|bench``
commands use them.
"""

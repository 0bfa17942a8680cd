"""VBench evaluation: vbench 0.1.5's own dimension code run offline, scores into the store.

Modules: ``dimensions`` (what each dimension needs), ``weights`` (the local weight cache;
``python -m harness.vbench.weights``), ``upstream`` (running vbench's code in a current
environment), ``dino`` (DINO without a repository clone), ``suites`` (standard suite, prompt lists,
folders), ``runner`` (dimension runs into the store), ``scoring`` (Total / Quality / Semantic),
``__main__`` (``python -m harness.vbench``).
"""

"""Shared pieces of the locate-then-edit methods (ROME, MEMIT).

- ``repr``: find the lookup token (subject's last token) and capture module inputs/outputs there;
- ``compute_v``: optimise the value delta that makes the model predict ``target_new``;
- ``update``: closed-form updates (rank-one ROME, batched least-squares MEMIT) and model checks;
- ``stats``: second moments E[k kᵀ] of the keys from a text corpus, cached on disk.
"""

"""The paper's evaluation metrics (identity, prompt fidelity, preference, diversity), via transformers.

Each scorer loads its model lazily from a hub id or a local folder; the pure math lives in
`similarity`, `inception_score` and `layout_diversity` so that it can be checked by hand.
"""

"""Pairwise reward models and WARM (weight-averaged reward models, arXiv 2401.12187).

`data`: preference pairs (JSONL, and a generator from a corpus with label noise);
`model`: scoring and the Bradley–Terry loss; `train`: M reward models from one init;
`warm`: their streamed weight average; `evaluate`: accuracy, ensembles, memorisation and
best-of-N. Nothing heavy is imported here.
"""

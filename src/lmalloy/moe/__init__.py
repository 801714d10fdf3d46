"""Mixtral-style sparse mixtures of experts: build from dense models, train, analyse.

`build` (upcycle / compose / btx), `router` (router initialisation as mergekit-moe),
`layout` (tensor names of both Mixtral layouts), `stats` (routing statistics, parameter
accounting), `analyze` (the `moe analyze` command). Mixtral: arXiv 2401.04088.
"""

"""Solving the layers as one nonlinear system (docs/design.md §1): the configuration grammar, the surrogates
(IDN, DiagN, HCN, ...), the structured Newton iteration, Jacobian tools, and the perplexity of a solve."""

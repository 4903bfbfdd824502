"""The lab: experiments on the product's models and data, apart from the product.

Each module is a script run from the repository root as `python -m research.<name> ...`; it may
import `app` and `training` but nothing in them imports it. Its question, the rule fixed before
its figures, the figures and the verdict are written up in docs/results/.
"""

"""Research code shipped with blackbox_zo but outside the engine's contract.

Modules here need more than loss values from a black box (e.g. `hzo`: the activations of a
white-box staged model), so they are not query plans, not in the estimator registry and not
sharded under torchrun. They are kept for the experiments that compare them with the engine.
"""

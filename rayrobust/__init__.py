"""rayrobust: train adversarially robust image classifiers on Ray and evaluate them honestly.

    >>> import rayrobust
    >>> result = rayrobust.evaluate(model, "fashion_mnist", eps=0.1, n=1000, n_autoattack=200)
"""
__version__ = "0.1.0"


def evaluate(*args, **kwargs):
    """Evaluate any `torch.nn.Module` returning logits; see `rayrobust.evaluation.core.evaluate`."""
    from .evaluation.core import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


evaluate.__doc__ = evaluate.__doc__

__all__ = ["evaluate", "__version__"]

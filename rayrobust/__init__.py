"""rayrobust: train adversarially robust image classifiers on Ray and evaluate them honestly.

    >>> import rayrobust
    >>> result = rayrobust.evaluate(model, "fashion_mnist", eps=0.1, n=1000, n_autoattack=200)
    >>> clean_acc, robust_acc = rayrobust.benchmark(model, n_examples=1000, dataset="cifar10", threat_model="Linf",
    ...                                             eps=8 / 255)
"""
__version__ = "0.1.0"


def evaluate(*args, **kwargs):
    """Evaluate any `torch.nn.Module` returning logits; see `rayrobust.evaluation.core.evaluate`."""
    from .evaluation.core import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def benchmark(*args, **kwargs):
    """RobustBench's `benchmark(model, n_examples, dataset, threat_model, eps, ...)` call, answered by rayrobust's
    evaluation: (clean_acc, robust_acc); see `rayrobust.evaluation.benchmark.benchmark`."""
    from .evaluation.benchmark import benchmark as _benchmark

    return _benchmark(*args, **kwargs)


__all__ = ["evaluate", "benchmark", "__version__"]

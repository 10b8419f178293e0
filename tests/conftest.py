"""Shared fixtures: float64 on demand and tiny models with dense references."""

import os

# The Keras bridge needs the JAX backend, chosen before Keras is first imported.
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    """The fast suite (plain ``pytest``) compiles with most of XLA's optimisations off:
    its programs are small and compiling them is most of its time (a quarter less with
    them off); the results are the same computations, rounded alike. The slow suite and
    its subprocesses compile as users do."""
    if config.option.markexpr == "not slow":
        jax.config.update("jax_disable_most_optimizations", True)


def pytest_ignore_collect(collection_path, config):
    """With slow tests deselected (plain ``pytest``), a test file marked slow as a whole
    (``pytestmark = pytest.mark.slow`` on a line of its own) is not even imported: its
    imports (TensorFlow, Keras) would take seconds, and the fast suite runs without them."""
    if config.option.markexpr != "not slow" or collection_path.suffix != ".py":
        return None
    lines = collection_path.read_text().splitlines()
    return True if any(ln.startswith("pytestmark = pytest.mark.slow") for ln in lines) else None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test file.

    XLA's CPU compiler maps every program's code into memory, and the mappings stay while
    the program is cached. One process running the whole suite reached Linux's limit of
    65,530 mappings per process (vm.max_map_count) and crashed inside the compiler
    (SIGSEGV) near the end of the run; with the caches cleared per file the peak was
    about 15,000 (in test_curvature)."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


def init_mlp(key, sizes, dtype=jnp.float32):
    """Nested-dict MLP params: {'layer0': {'w': .., 'b': ..}, ...}."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, kw, kb = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "w": (jax.random.normal(kw, (n_in, n_out)) / np.sqrt(n_in)).astype(dtype),
            "b": (0.1 * jax.random.normal(kb, (n_out,))).astype(dtype),
        }
    return params


def mlp_apply(params, x):
    n = len(params)
    for i in range(n):
        layer = params[f"layer{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def mlp_loss(params, batch):
    """Mean softmax cross-entropy of the MLP on (x, integer labels)."""
    x, y = batch
    logits = mlp_apply(params, x)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def classification_data(key, n, n_in, n_classes, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, n_in)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, n_classes)
    return np.asarray(x), np.asarray(y)


@pytest.fixture(scope="session")
def digits_dense():
    """The digits MLP (2,410 parameters) trained for 200 steps, and the dense float64
    Hessian of its mean loss over all 1,797 samples: (loss, params, (x, y), hessian)."""
    from jax.flatten_util import ravel_pytree

    from jax_spectral import datasets

    x, y = datasets.load_digits()
    model = datasets.mlp()
    loss = datasets.cross_entropy_loss(model.apply)
    params = model.init(jax.random.key(0), x[:1])["params"]
    params = datasets.train_classifier(loss, params, (x, y), steps=200)
    with jax.enable_x64(True):  # jax.hessian of the whole-data loss: no HVP code under test
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        flat, unravel = ravel_pytree(p64)
        whole = (jnp.asarray(x, jnp.float64), jnp.asarray(y))
        dense = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), whole)))(flat))
    return loss, params, (x, y), (dense + dense.T) / 2


def counted_batches(x, y, size):
    """``(batches, reads)``: a callable yielding ``(x, y)`` batches of ``size`` afresh on
    each call, and the list of batch starts it has read (to count passes over the data)."""
    reads = []

    def batches():
        for i in range(0, len(x), size):
            reads.append(i)
            yield x[i : i + size], y[i : i + size]

    return batches, reads

"""A Keras callback that records the spectrum every N epochs (see
:mod:`jax_spectral.training`). Keras is imported only when the callback is made."""

from __future__ import annotations

import os
from typing import Any

import jax

from .closure import _keras, pure_loss, trainable_values


def spectrum_callback(
    folder: str | os.PathLike,
    loss_function: Any,
    data: Any,
    *,
    every: int = 1,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    **record_options: Any,
) -> Any:
    """A ``keras.callbacks.Callback`` that, at the end of every ``every``-th epoch (and
    before the first, as epoch 0's starting point is the initialisation), writes the
    spectrum of the Hessian of ``loss_function(model, batch)`` over ``data`` at the
    current weights to ``folder`` (``jax_spectral.training.record``; the record's ``step``
    is the number of epochs finished). ``data`` and ``batch_size`` are as for
    ``jax_spectral.hessian_operator``; ``record_options`` (``order``, ``num_probes``,
    ``top_k``, ...) go to ``record``. The weights are read, never written: the model, its
    optimizer and the training that follows are the same as without the callback. Read
    the records back with ``jax_spectral.training.load(folder)``. Each ``fit`` call counts
    its epochs from 0 again, so a second ``fit`` replaces the first one's records: give
    each its own callback and folder.
    """
    import jax_spectral as js

    keras = _keras()
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}.")
    key = jax.random.key(0) if key is None else key

    class SpectrumCallback(keras.callbacks.Callback):
        def _record(self, epochs: int) -> None:
            loss = pure_loss(self.model, loss_function)
            params = [jax.numpy.array(x) for x in trainable_values(self.model)]  # copies
            operator = js.hessian_operator(loss, params, data, batch_size=batch_size)
            js.training.record(
                folder, epochs, operator, jax.random.fold_in(key, epochs), **record_options
            )

        def on_train_begin(self, logs=None):
            self._record(0)

        def on_epoch_end(self, epoch, logs=None):
            if (epoch + 1) % every == 0:
                self._record(epoch + 1)

    return SpectrumCallback()

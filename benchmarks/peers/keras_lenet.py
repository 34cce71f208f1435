"""Keras 3 peer on the JAX backend: the seed's LeNet-5 as a Sequential model
(Xavier-uniform = glorot_uniform, zero biases, SGD lr 0.1), trained with
`model.fit` on in-memory arrays, as a Keras user would. Runs in the Keras
environment (setup.sh)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

import common  # noqa: E402


def lenet() -> keras.Model:
    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Rescaling(1 / 255.0),
        L.Conv2D(6, 5, padding="same", activation="sigmoid"), L.AveragePooling2D(2),
        L.Conv2D(16, 5, activation="sigmoid"), L.AveragePooling2D(2), L.Flatten(),
        L.Dense(120, activation="sigmoid"), L.Dense(84, activation="sigmoid"), L.Dense(10),
    ])


def main() -> None:
    args = common.parse_args()
    keras.utils.set_random_seed(0)
    images, labels = common.load_train(args.data_dir)
    model = lenet()
    model.compile(optimizer=keras.optimizers.SGD(common.LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def train_epoch(epoch: int) -> None:
        idx = common.batches(len(labels), args.batch_size, epoch).reshape(-1)
        model.fit(images[idx], labels[idx], batch_size=args.batch_size, epochs=1,
                  shuffle=False, verbose=0)

    common.run(f"Keras {keras.__version__} on JAX, model.fit", train_epoch,
               len(labels), args, model.count_params())


if __name__ == "__main__":
    main()

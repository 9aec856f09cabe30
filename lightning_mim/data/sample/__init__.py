"""The bundled sample images (a class-balanced CIFAR-10 subset) for the quickstart, tests and examples."""

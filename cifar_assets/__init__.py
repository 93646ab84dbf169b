"""CIFAR-10 asset platform: a Dagster code location around a ResNet18 classifier."""

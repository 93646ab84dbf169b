"""Templates of the python-backend model.py files that run inside Triton's stub process.

They import ``triton_python_backend_utils``, which exists only there: never import them from the
package; ``cifar_assets.serving.repository`` copies them into the model repository.
"""

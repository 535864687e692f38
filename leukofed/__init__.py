"""leukofed: federated training and serving of an ALL blood-smear classifier.

The shared core lives here (labels, image preprocessing, dataset reading, splits,
hospital partitions, model zoo, training, metrics, ONNX export). Services under
``services/`` import it; nothing in it is copied into a service.
"""

__version__ = "0.1.0"

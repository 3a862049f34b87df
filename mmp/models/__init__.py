"""Comparing runs, promoting the best model, and serving or deploying it.

Each concern is its own module (compare, plot, promote, serve, endpoint, gitops,
finale); MLflow, matplotlib and boto3 are imported inside functions, so importing
this package costs nothing on the webhook path.
"""

-- Run once by the postgres image on an empty volume: MLflow's backend beside Dagster's.
CREATE DATABASE mlflow OWNER cifar;

"""Batch inference: classify an image, a folder, a glob, a file list or a bucket prefix with Ray Data.

Data flow, streaming end to end (the driver holds the list of paths, never pixels or predictions):

    list_inputs(input)               driver: file paths only (strings)
      -> ray.data.from_arrow         blocks of paths (+ the true class when the folders are labelled)
      -> map_batches(decode_batch)   tasks: read bytes through pyarrow.fs, ``decode_image`` per file;
                                     a file that cannot be read or decoded is written to an error part
                                     and dropped, so one corrupt file never fails the job
      -> map_batches(Predictor)      actor pool: each actor loads the model once, then classifies
      -> write_parquet(staging)      Parquet parts written as batches complete
    then the driver finalises: errors file, predictions (one file sorted by path, or the parts),
    accuracy + confusion matrix from the parts (read batch by batch), and ``summary.json`` last.

Outputs, by the form of ``infer.output``:

    predictions.csv / .parquet   one file sorted by path, written under a temporary name and renamed;
                                 beside it <stem>.errors.csv, <stem>.summary.json and, for labelled
                                 inputs, <stem>.confusion_matrix.png
    any other path (a folder)    predictions/*.parquet (parts, unsorted), errors.csv,
                                 confusion_matrix.png, summary.json

The summary file is written last: if it is there, everything it names is complete. Staging lives
in a hidden folder beside the output (``.<name>.staging-<id>`` or ``<dir>/.staging-<id>``) and is
deleted at the end.

Prediction columns (the same in CSV and Parquet, so a file can be swapped for the other):

    path                  string   absolute local path or URI of the image
    predicted_class       string   class name of the arg-max
    confidence            float32  probability of predicted_class
    top_k_classes         string   JSON list of the infer.top_k most probable class names, best first
    top_k_probabilities   string   JSON list of their probabilities (rounded to 6 decimals)
    true_class            string   labelled inputs only: the folder name
    true_class_rank       int32    labelled inputs only: 1 = top-1 correct, <= 5 = top-5 correct

Top-k is stored as JSON strings rather than list columns or top1..topK columns so that the schema
does not depend on the file format or on k: ``json.loads`` (or DuckDB's ``json``) reads it back.
Errors file columns: ``path``, ``reason``, sorted by path.

Labelled inputs: when every file sits in a folder named after one of the model's classes (the
first folder level below the input root, e.g. ``test/<class>/x.png``; for file lists and single
files, the file's parent folder) the summary also holds top-1/top-5 accuracy, per-class accuracy
and the confusion matrix over the classified files (failed files are counted apart).
"""

from pipeline.infer.inputs import list_inputs
from pipeline.infer.outputs import IncompleteOutput
from pipeline.infer.predictor import (ERROR_SCHEMA, Predictor, decode_batch, predict_image, prediction_columns,
                                      prediction_schema)
from pipeline.infer.run import InferencePlan, build_dataset, plan_inference, run_inference

__all__ = ["ERROR_SCHEMA", "IncompleteOutput", "InferencePlan", "Predictor", "build_dataset", "decode_batch",
           "list_inputs", "plan_inference", "predict_image", "prediction_columns", "prediction_schema",
           "run_inference"]

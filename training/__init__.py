"""Reproducible training and ONNX export of medinfer's reference models.

Modules:

- ``training.ehr_heart_disease``: tabular CAD risk model (UCI Heart Disease), run with
  ``python -m training.ehr_heart_disease``.
- ``training.cxr_pneumonia``: ResNet-style CNN trained on synthetic chest-radiograph
  phantoms, run with ``python -m training.cxr_pneumonia``.
- ``training.phantoms``: procedural chest-radiograph phantom generator (numpy only).
- ``training.dicom_studies``: writes phantoms as DICOM Part 10 CR/DX studies (numpy and
  pydicom only).
- ``training.reproduce``: retrains both models into a scratch folder and checks that the
  metrics in ``models/<name>/metrics.json`` are reproduced.

``phantoms`` and ``dicom_studies`` deliberately import nothing beyond numpy and pydicom
so that the service's test suite can use them without torch or scikit-learn.
"""

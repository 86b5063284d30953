"""Exact Shapley contributions over real ONNX graphs: the axioms, the reference model, the encoders.

The reference for the exact method is the textbook definition, computed independently: the mean
over all n! orderings of each feature's marginal gain, one ONNX Runtime call per coalition.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment
from onnx import TensorProto, helper, numpy_helper

from app.encoders.explanation import FEATURE_CONTRIBUTION_EXTENSION, explanation_fhir, explanation_json
from app.errors import InferenceFailedError, ModelSpecError
from app.inference.registry import ServedVersion, load_version
from app.inference.spec import load_spec
from app.postprocess.explain import MAX_FEATURES, Contributions, Space, baseline_vector, shapley

EHR = Path(__file__).resolve().parents[2] / "models" / "ehr-heart-disease"
Run = Callable[[npt.NDArray[np.floating]], npt.NDArray[np.floating]]
Array = npt.NDArray[np.float64]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def _run_of(session: ort.InferenceSession, output: str = "probabilities") -> Run:
    def run(batch: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
        result: npt.NDArray[np.floating] = session.run([output], {"features": batch})[0]
        return result

    return run


def _binary_head(nodes: list[onnx.NodeProto], score: str) -> list[onnx.NodeProto]:
    """``probabilities = [1 - sigmoid(score), sigmoid(score)]``."""
    return [
        *nodes,
        helper.make_node("Sigmoid", [score], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ]


def _graph(nodes: list[onnx.NodeProto], n: int, initializers: dict[str, Array]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in initializers.items()]
    inits.append(numpy_helper.from_array(np.ones((1, 1), np.float32), "one"))
    graph = helper.make_graph(
        _binary_head(nodes, "score"),
        "explain_test",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def logistic_model(weights: Array, bias: float) -> onnx.ModelProto:
    """``sigmoid(x . w + c)``: additive in log-odds, with the closed form ``w_i (x_i - b_i)``."""
    nodes = [
        helper.make_node("MatMul", ["features", "w"], ["dot"]),
        helper.make_node("Add", ["dot", "c"], ["score"]),
    ]
    return _graph(nodes, weights.size, {"w": weights.reshape(-1, 1), "c": np.array([[bias]])})


def mlp_model(hidden: Array, out: Array) -> onnx.ModelProto:
    """``sigmoid(tanh(x W1) w2 + x2 * x3)``: interactions of every order, and one explicit product."""
    nodes = [
        helper.make_node("MatMul", ["features", "W1"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["mlp"]),
        helper.make_node("Gather", ["features", "i3"], ["x3"], axis=1),
        helper.make_node("Gather", ["features", "i2"], ["x2"], axis=1),
        helper.make_node("Mul", ["x2", "x3"], ["x2x3"]),
        helper.make_node("Add", ["mlp", "x2x3"], ["score"]),
    ]
    model = _graph(nodes, hidden.shape[0], {"W1": hidden, "w2": out.reshape(-1, 1)})
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.array([3], np.int64), "i3"), numpy_helper.from_array(np.array([2], np.int64), "i2")]
    )
    return model


def by_definition(run: Run, x: Array, b: Array, positive: int, space: Space) -> Array:
    """Shapley values as the mean marginal gain over all orderings, one run per coalition."""
    n = x.size

    def value(members: frozenset[int]) -> float:
        row = np.where([i in members for i in range(n)], x, b).astype(np.float32)[None, :]
        p = float(run(row)[0, positive])
        if space == "probability":
            return p
        p = min(max(p, 1e-7), 1 - 1e-7)
        return math.log(p / (1 - p))

    cache: dict[frozenset[int], float] = {}
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        before: frozenset[int] = frozenset()
        for i in order:
            after = before | {i}
            for s in (before, after):
                if s not in cache:
                    cache[s] = value(s)
            phi[i] += cache[after] - cache[before]
            before = after
    return phi / math.factorial(n)


def assert_efficient(c: Contributions) -> None:
    total = c.output_value - c.base_value
    assert math.isclose(sum(c.values), total, rel_tol=1e-6, abs_tol=1e-9)


@pytest.fixture(scope="module")
def mlp() -> Run:
    rng = np.random.default_rng(7)
    hidden = rng.normal(size=(5, 4))
    hidden[1] = hidden[0]  # features 0 and 1 act alike
    hidden[4] = 0.0  # feature 4 is ignored by the graph
    return _run_of(_session(mlp_model(hidden, rng.normal(size=4))))


@pytest.fixture(scope="module")
def ehr() -> ServedVersion:
    spec = load_spec(EHR)
    return load_version(spec, EHR, spec.served_versions()[-1])


@pytest.fixture(scope="module")
def ehr_baseline(ehr: ServedVersion) -> Array:
    assert ehr.spec.explain is not None
    return baseline_vector(ehr.spec.explain.baseline, ehr.spec.preprocessing["feature_order"])


def ehr_run(ehr: ServedVersion) -> Run:
    """What the pipeline passes: the served version's own session."""
    return _run_of(ehr.loaded.session)


RECORDS = {
    "typical": [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3, 3, 0, 6],
    "with_missing": [57, 0, 4, 120, np.nan, 0, 1, np.nan, 1, 1.0, np.nan, np.nan, 7],
    "extreme": [77, 1, 4, 200, 603, 1, 2, 63, 1, 5.0, 2, 3, 7],
}


@pytest.mark.parametrize("space", ["probability", "log_odds"])
def test_exact_values_equal_the_definition_over_all_orderings(mlp: Run, space: Space) -> None:
    x = np.array([0.9, 0.9, -1.2, 0.4, 2.0])
    b = np.array([0.1, 0.1, 0.3, -0.5, -1.0])
    c = shapley(mlp, x.astype(np.float32), b, positive_index=1, space=space)
    np.testing.assert_allclose(c.values, by_definition(mlp, x, b, 1, space), atol=2e-6)
    assert_efficient(c)
    assert c.method == "exact"
    assert c.evaluations == 2**5


def test_features_that_act_alike_get_equal_shares(mlp: Run) -> None:
    x = np.array([1.5, 1.5, -0.7, 0.2, 0.0], np.float32)
    c = shapley(mlp, x, np.array([-0.5, -0.5, 0.4, 0.1, 0.3]), positive_index=1, space="log_odds")
    assert c.values[0] == pytest.approx(c.values[1], abs=1e-6)
    assert abs(c.values[0]) > 0.01


def test_a_feature_the_graph_ignores_gets_exactly_zero(mlp: Run) -> None:
    x = np.array([1.0, -1.0, 0.5, 0.2, 9.0], np.float32)
    c = shapley(mlp, x, np.array([0.0, 0.0, 0.0, 0.0, -9.0]), positive_index=1, space="probability")
    assert c.values[4] == 0.0
    assert_efficient(c)


def test_a_feature_at_its_baseline_value_gets_zero_and_is_not_enumerated(mlp: Run) -> None:
    x = np.array([1.0, -1.0, 0.5, 0.2, 0.3], np.float32)
    b = np.array([0.0, 0.0, 0.5, 0.0, 0.3])
    c = shapley(mlp, x, b, positive_index=1, space="log_odds")
    assert (c.values[2], c.values[4]) == (0.0, 0.0)
    assert c.evaluations == 2**3
    np.testing.assert_allclose(c.values, by_definition(mlp, x.astype(np.float64), b, 1, "log_odds"), atol=2e-6)


def test_logistic_model_matches_the_closed_form_and_the_cheap_path_equals_the_general_one() -> None:
    rng = np.random.default_rng(3)
    w = 0.3 * rng.normal(size=9)
    run = _run_of(_session(logistic_model(w, 0.4)))
    x = rng.normal(size=9).astype(np.float32)
    b = rng.normal(size=9)
    exact = shapley(run, x, b, positive_index=1, space="log_odds")
    cheap = shapley(run, x, b, positive_index=1, space="log_odds", additive=True)
    closed = w.astype(np.float32).astype(np.float64) * (x - b.astype(np.float32))
    np.testing.assert_allclose(exact.values, closed, atol=1e-5)
    np.testing.assert_allclose(cheap.values, exact.values, atol=1e-5)
    assert (exact.method, exact.evaluations) == ("exact", 2**9)
    assert (cheap.method, cheap.evaluations) == ("additive", 9 + 2)
    assert_efficient(exact)
    assert_efficient(cheap)


def test_the_cheap_path_falls_back_to_exact_when_the_model_is_not_additive(mlp: Run) -> None:
    x = np.array([0.9, 0.9, -1.2, 0.4, 2.0], np.float32)
    b = np.array([0.1, 0.1, 0.3, -0.5, -1.0])
    hinted = shapley(mlp, x, b, positive_index=1, space="log_odds", additive=True)
    exact = shapley(mlp, x, b, positive_index=1, space="log_odds")
    assert hinted.method == "exact"
    assert hinted.values == exact.values


def test_more_than_16_features_are_refused_before_anything_runs() -> None:
    n = MAX_FEATURES + 1
    calls: list[int] = []
    session = _session(logistic_model(np.ones(n), 0.0))

    def run(batch: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
        calls.append(batch.shape[0])
        return _run_of(session)(batch)

    with pytest.raises(ModelSpecError, match="17 features is over the limit of 16"):
        shapley(run, np.ones(n, np.float32), np.zeros(n), positive_index=1, space="log_odds")
    assert calls == []
    session16 = _session(logistic_model(np.full(MAX_FEATURES, 0.1), 0.0))
    c = shapley(
        _run_of(session16),
        np.ones((1, MAX_FEATURES), np.float32),
        np.zeros(MAX_FEATURES),
        positive_index=1,
        space="log_odds",
    )
    assert c.evaluations == 2**MAX_FEATURES
    np.testing.assert_allclose(c.values, np.full(MAX_FEATURES, 0.1), atol=1e-5)


def test_a_baseline_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ModelSpecError, match="lacks a value for: chol"):
        baseline_vector({"age": 50.0}, ["age", "chol"])
    with pytest.raises(ModelSpecError, match="does not have: bmi"):
        baseline_vector({"age": 50.0, "bmi": 25.0}, ["age"])
    with pytest.raises(ModelSpecError, match="finite"):
        baseline_vector({"age": math.nan}, ["age"])
    run = _run_of(_session(logistic_model(np.ones(3), 0.0)))
    with pytest.raises(ModelSpecError, match="2 values for 3 features"):
        shapley(run, np.ones(3, np.float32), np.zeros(2), positive_index=1, space="log_odds")


def test_a_run_that_answers_the_wrong_shape_is_an_inference_failure() -> None:
    session = _session(logistic_model(np.ones(3), 0.0))
    with pytest.raises(InferenceFailedError, match="positive label at column 2"):
        shapley(_run_of(session), np.ones(3, np.float32), np.zeros(3), positive_index=2, space="log_odds")


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("space", ["probability", "log_odds"])
def test_reference_model_contributions_sum_to_prediction_minus_baseline(
    ehr: ServedVersion, ehr_baseline: Array, record: str, space: Space
) -> None:
    run = ehr_run(ehr)
    x = np.array(RECORDS[record], np.float32)
    c = shapley(run, x, ehr_baseline, positive_index=1, space=space, names=ehr.spec.preprocessing["feature_order"])
    assert_efficient(c)
    p_x = float(run(x[None, :])[0, 1])
    p_b = float(run(ehr_baseline.astype(np.float32)[None, :])[0, 1])
    if space == "log_odds":
        p_x, p_b = math.log(p_x / (1 - p_x)), math.log(p_b / (1 - p_b))
    assert c.output_value == pytest.approx(p_x, abs=1e-6)
    assert c.base_value == pytest.approx(p_b, abs=1e-6)
    assert c.names[0] == "age"


def test_reference_model_imputed_features_contribute_exactly_zero(ehr: ServedVersion, ehr_baseline: Array) -> None:
    """The baseline is the graph's imputation value, so NaN and the baseline are the same input."""
    x = np.array(RECORDS["with_missing"], np.float32)
    c = shapley(ehr_run(ehr), x, ehr_baseline, positive_index=1, space="log_odds")
    missing = np.flatnonzero(np.isnan(x))
    assert missing.size == 4
    assert all(c.values[i] == 0.0 for i in missing)
    assert all(c.values[i] != 0.0 for i in np.flatnonzero(~np.isnan(x) & (x != ehr_baseline.astype(np.float32))))


def test_declared_imputation_makes_imputed_features_null_players_without_changing_any_value(
    ehr: ServedVersion, ehr_baseline: Array
) -> None:
    """model.toml declares the values the graph substitutes for NaN; playing a NaN as that value
    must give the same answer as the graph's own imputation, from fewer rows."""
    names = ehr.spec.preprocessing["feature_order"]
    imputation = baseline_vector(ehr.spec.preprocessing["imputation"], names)
    x = np.array(RECORDS["with_missing"], np.float32)
    through = shapley(ehr_run(ehr), x, ehr_baseline, positive_index=1, space="log_odds")
    played = shapley(ehr_run(ehr), x, ehr_baseline, positive_index=1, space="log_odds", imputation=imputation)
    np.testing.assert_allclose(played.values, through.values, atol=1e-9)
    assert (played.base_value, played.output_value) == pytest.approx((through.base_value, through.output_value))
    assert (through.evaluations, played.evaluations) == (2**11, 2**7)
    assert np.isnan(played.inputs[4])


def _fold_logits(model: onnx.ModelProto) -> list[str]:
    """The graph's per-fold Platt arguments ``a_k * df_k + b_k`` (``P_k = 1 / (1 + exp(.))``)."""
    return [n.output[0] for n in model.graph.node if n.op_type == "Add" and n.output[0].startswith("exp_parameter")]


def _fold_closed_form(model: onnx.ModelProto, x: Array, b: Array) -> list[Array]:
    """Per fold, ``-a_k * sum over the raw feature's columns of w_kc (z_c(x) - z_c(b))``.

    Read from the graph itself: column groups (ArrayFeatureExtractor), the Scaler of the
    numeric group, the one-hot categories of the coded group, each LinearClassifier's class-1
    weights and each fold's Platt slope ``a_k``.
    """
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = list(model.graph.node)
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    groups = [inits[n.input[1]] for n in nodes if n.op_type == "ArrayFeatureExtractor" and n.input[0] == "features"]
    scaler = next(a for n, a in zip(nodes, attrs, strict=True) if n.op_type == "Scaler")
    onehots = [a["cats_int64s"] for n, a in zip(nodes, attrs, strict=True) if n.op_type == "OneHotEncoder"]

    def z(v: Array) -> list[Array]:
        """The transformed columns of each raw feature, in the classifier's column order."""
        cols: dict[int, Array] = {}
        for j, i in enumerate(groups[0]):
            cols[int(i)] = np.array([(v[i] - scaler["offset"][j]) * scaler["scale"][j]])
        for i in groups[1]:
            cols[int(i)] = np.array([v[i]])
        for cats, i in zip(onehots, groups[2], strict=True):
            cols[int(i)] = (np.array(cats) == round(v[i])).astype(np.float64)
        return [cols[int(i)] for i in np.concatenate(groups)]

    order = np.concatenate(groups)
    zx, zb = z(x), z(b)
    sizes = [c.size for c in zx]
    classifiers = [a for n, a in zip(nodes, attrs, strict=True) if n.op_type == "LinearClassifier"]
    slopes = [inits[n.input[0]] for n in nodes if n.op_type == "Mul" and n.output[0].startswith("a_df_prod")]
    out = []
    for clf, slope in zip(classifiers, slopes, strict=True):
        w = np.array(clf["coefficients"]).reshape(2, -1)[1]
        per_feature = np.split(w, np.cumsum(sizes)[:-1])
        phi = np.zeros(x.size)
        for i, wi, a_, b_ in zip(order, per_feature, zx, zb, strict=True):
            phi[i] = -float(slope) * float(wi @ (a_ - b_))
        out.append(phi)
    return out


def test_each_calibrated_fold_is_linear_in_log_odds_but_their_average_is_not(
    ehr: ServedVersion, ehr_baseline: Array
) -> None:
    """Platt scaling of a logistic model is linear in log-odds per raw feature (one-hot columns
    of a coded feature are its own), so each fold equals its closed form. The served model
    averages five folds' probabilities, which is not additive: exact it must be."""
    model = onnx.load(EHR / "1" / "model.onnx")
    folds = _fold_logits(model)
    assert len(folds) == 5
    model.graph.output.extend([helper.make_tensor_value_info(f, TensorProto.FLOAT, ["N", 1]) for f in folds])
    session = _session(model)
    x64 = np.array(RECORDS["typical"], np.float64)
    x = x64.astype(np.float32)

    def fold_run(name: str) -> Run:
        def run(batch: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
            e = session.run([name], {"features": batch})[0].astype(np.float64).reshape(-1, 1)
            p = 1.0 / (1.0 + np.exp(e))
            return np.hstack([1.0 - p, p])

        return run

    closed = _fold_closed_form(model, x.astype(np.float64), ehr_baseline.astype(np.float32).astype(np.float64))
    for name, expected in zip(folds, closed, strict=True):
        exact = shapley(fold_run(name), x, ehr_baseline, positive_index=1, space="log_odds")
        np.testing.assert_allclose(exact.values, expected, atol=1e-5)
        cheap = shapley(fold_run(name), x, ehr_baseline, positive_index=1, space="log_odds", additive=True)
        assert cheap.method == "additive"
        np.testing.assert_allclose(cheap.values, exact.values, atol=1e-5)

    run = ehr_run(ehr)
    exact = shapley(run, x, ehr_baseline, positive_index=1, space="log_odds")
    averaged = np.mean(closed, axis=0)
    assert np.max(np.abs(np.array(exact.values) - averaged)) > 1e-3
    assert shapley(run, x, ehr_baseline, positive_index=1, space="log_odds", additive=True).method == "exact"


def _contributions() -> Contributions:
    return Contributions(
        names=("age", "chol", "thal"),
        values=(0.25, -0.0, -0.75),
        inputs=(63.0, math.nan, 7.0),
        baselines=(53.0, 240.0, 3.0),
        base_value=0.1,
        output_value=-0.4,
        space="log_odds",
        method="exact",
        evaluations=8,
    )


def test_json_explanation_lists_features_by_size_and_says_what_the_numbers_mean() -> None:
    body = explanation_json(_contributions(), label="cad")
    assert [r["feature"] for r in body["contributions"]] == ["thal", "age", "chol"]
    assert body["contributions"][2] == {
        "feature": "chol",
        "value_given": None,
        "imputed": True,
        "baseline": 240.0,
        "contribution": -0.0,
    }
    assert (body["method"], body["computation"], body["space"]) == ("shapley", "exact", "log_odds")
    assert (body["base_value"], body["output_value"]) == (0.1, -0.4)
    assert "log-odds of P(cad)" in body["statement"]
    assert "sum to the difference" in body["statement"]


def test_fhir_explanation_validates_on_a_risk_assessment(ehr: ServedVersion, ehr_baseline: Array) -> None:
    c = shapley(
        ehr_run(ehr),
        np.array(RECORDS["with_missing"], np.float32),
        ehr_baseline,
        positive_index=1,
        space="log_odds",
        names=ehr.spec.preprocessing["feature_order"],
    )
    extensions, note = explanation_fhir(c, label="cad")
    resource = {
        "resourceType": "RiskAssessment",
        "status": "preliminary",
        "subject": {"display": "patient not identified in the request"},
        "prediction": [{"outcome": {"text": "cad"}, "probabilityDecimal": 42.0}],
        "extension": extensions,
        "note": [note],
    }
    parsed = json.loads(RiskAssessment.model_validate(resource).model_dump_json())
    assert len(parsed["extension"]) == 13
    first = parsed["extension"][0]
    assert first["url"] == FEATURE_CONTRIBUTION_EXTENSION
    assert [e["url"] for e in first["extension"]] == ["name", "contribution", "space"]
    largest = max(range(13), key=lambda i: abs(c.values[i]))
    assert first["extension"][0]["valueString"] == c.names[largest]
    assert first["extension"][1]["valueDecimal"] == pytest.approx(c.values[largest], abs=1e-6)
    assert first["extension"][2]["valueCode"] == "log-odds"
    assert note["text"].startswith("Exact Shapley contributions in log-odds of P(cad)")

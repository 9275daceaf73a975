"""The SQL data source: an OMOP cohort query, per-column checks, and a database never written.

Every read-only test checks the database afterwards (row counts and, for SQLite, the file's
bytes): refusing with an error is not enough if something was written first.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select, text

from peer.data import (
    DataError,
    DataSource,
    PatientStore,
    ReadOnlyError,
    SourceError,
    SQLSource,
    SQLSourceConfig,
    check_select_only,
    hash_split,
    read_only_engine,
)
from peer.data.omop import (
    OMOP_COHORT_FEATURES,
    OMOP_COHORT_QUERY,
    OMOP_REGRESSION_FEATURES,
    OMOP_REGRESSION_QUERY,
    OMOP_REGRESSION_TARGET,
    omop_metadata,
)
from peer.data.omop import write_synthetic_omop as write_omop

N_PERSONS = 120

# The network tests' throwaway PostgreSQL server (skips where none can be started). Imported
# by name at run time: mypy knows that file only as the top-level module ``test_postgres``.
postgres_url = importlib.import_module("network.test_postgres").postgres_url


@pytest.fixture
def omop_sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'omop.db'}"
    engine = create_engine(url)
    write_omop(engine, N_PERSONS, np.random.default_rng(1))
    engine.dispose()
    return url


def cohort(url: str, **changes: object) -> SQLSourceConfig:
    config = SQLSourceConfig(
        url=url,
        query=OMOP_COHORT_QUERY,
        id_column="person_id",
        feature_columns=OMOP_COHORT_FEATURES,
        label_column="ckd",
        missing="drop",
        name="omop-ckd",
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def fingerprint(url: str) -> tuple[dict[str, int], str | None]:
    """Row counts of the OMOP tables, and the SQLite file's hash."""
    engine = create_engine(url)
    with engine.connect() as connection:
        counts = {
            name: int(connection.execute(select(func.count()).select_from(table)).scalar_one())
            for name, table in omop_metadata().tables.items()
        }
    engine.dispose()
    digest = None
    if url.startswith("sqlite:///"):
        digest = hashlib.sha256(Path(url[len("sqlite:///") :]).read_bytes()).hexdigest()
    return counts, digest


def expected_cohort(url: str) -> tuple[list[int], list[int]]:
    """Person ids with every feature measured, and their CKD labels, computed in Python."""
    engine = create_engine(url)
    tables = omop_metadata().tables
    with engine.connect() as connection:
        persons = [r[0] for r in connection.execute(select(tables["person"].c.person_id))]
        hba1c = {
            r[0]
            for r in connection.execute(
                select(tables["measurement"].c.person_id).where(
                    tables["measurement"].c.measurement_concept_id == 3004410
                )
            )
        }
        ckd = {
            r[0]
            for r in connection.execute(
                select(tables["condition_occurrence"].c.person_id).where(
                    tables["condition_occurrence"].c.condition_concept_id == 46271022
                )
            )
        }
    engine.dispose()
    kept = sorted(p for p in persons if p in hba1c)
    return kept, [int(p in ckd) for p in kept]


# --------------------------------------------------------------------------- the cohort


def check_cohort(url: str) -> None:
    source = SQLSource(cohort(url))
    info = source.describe()
    kept, labels = expected_cohort(url)
    assert info.kind == "tabular"
    assert info.feature_names == OMOP_COHORT_FEATURES
    assert info.input_shape == (4,)
    assert info.count() == len(kept) < N_PERSONS  # persons without HbA1c were dropped
    both = {c: sum(info.label_counts[s].get(c, 0) for s in ("train", "test")) for c in (0, 1)}
    assert both == {0: labels.count(0), 1: labels.count(1)}
    hba1c = next(c for c in info.columns if c.name == "hba1c")
    assert hba1c.missing == N_PERSONS - len(kept) > 0
    assert hba1c.kind == "float"
    assert any("dropped for a missing feature" in note for note in info.notes)
    # The split follows each person id, so it is the same on every run.
    test_ids = {p for p in kept if hash_split(str(p), 0.2) == "test"}
    x_test, y_test = source.load("test")
    assert x_test.shape == (len(test_ids), 4)
    assert x_test.dtype == np.float32
    assert y_test.tolist() == [labels[kept.index(p)] for p in sorted(test_ids)]
    x_train, _ = source.load("train")
    # age is 2024 - year_of_birth: between 30 and 90 by construction
    assert ((x_train[:, 0] >= 30) & (x_train[:, 0] < 90)).all()
    assert set(np.unique(x_train[:, 1])) == {0.0, 1.0}


def test_an_omop_cohort_query_yields_features_and_labels(omop_sqlite: str) -> None:
    check_cohort(omop_sqlite)


def test_sources_share_one_protocol(omop_sqlite: str, tmp_path: Path) -> None:
    """The payload's seam: the SQL source and the patient store are both DataSources."""
    from peer.data import breast_cancer_feature_names, breast_cancer_records

    store = PatientStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.create()
    records = breast_cancer_records(np.random.default_rng(0))
    store.add_records(records, feature_names=breast_cancer_feature_names(), dataset_name="bc")
    sources: list[DataSource] = [SQLSource(cohort(omop_sqlite)), store]
    for source in sources:
        info = source.describe()
        x, y = source.load("train")
        assert x.shape == (info.count("train"), *info.input_shape)
        assert sum(info.label_counts["train"].values()) == len(y)
        first = next(iter(source.tf_dataset("train")))
        np.testing.assert_array_equal(first[0].numpy(), x[0])
    assert store.describe().count() == len(records)
    store.dispose()


# --------------------------------------------------------------------------- column checks


def problems_of(config: SQLSourceConfig) -> list[str]:
    with pytest.raises(SourceError) as caught:
        SQLSource(config).describe()
    return [str(issue) for issue in caught.value.issues]


def test_missing_values_are_refused_by_default_naming_the_column(omop_sqlite: str) -> None:
    problems = problems_of(cohort(omop_sqlite, missing="refuse"))
    assert len(problems) == 1
    assert problems[0].startswith("column 'hba1c': ")
    assert "values are missing (NULL)" in problems[0]


def test_columns_the_query_does_not_yield_are_named(omop_sqlite: str) -> None:
    problems = problems_of(
        cohort(omop_sqlite, feature_columns=("age", "egfr"), label_column="has_ckd")
    )
    assert any(p.startswith("column 'egfr': feature column not yielded") for p in problems)
    assert any(p.startswith("column 'has_ckd': label column not yielded") for p in problems)
    assert "'person_id', 'age', 'female'" in problems[0]  # what the query does yield


def test_bad_types_labels_and_ids_are_reported_per_column(omop_sqlite: str) -> None:
    query = """
        SELECT p.person_id % 50 AS pid,
               CAST(p.year_of_birth AS TEXT) AS born,
               2024 - p.year_of_birth AS age,
               CASE WHEN p.person_id = 7 THEN NULL
                    WHEN p.person_id = 8 THEN 5 ELSE p.person_id % 2 END AS label
          FROM person p"""
    problems = problems_of(
        cohort(
            omop_sqlite,
            query=query,
            id_column="pid",
            feature_columns=("age", "born"),
            label_column="label",
            classes=("0", "1"),
        )
    )
    by_column: dict[str, list[str]] = {}
    for problem in problems:
        column, _, message = problem.partition(": ")
        by_column.setdefault(column, []).append(message)
    assert set(by_column) == {"column 'pid'", "column 'born'", "column 'label'"}
    assert any("occurs 3 times" in m for m in by_column["column 'pid'"])
    assert "holds str values, not numbers" in by_column["column 'born'"][0]
    labels = by_column["column 'label'"]
    assert any("label None of patient 7" in m for m in labels)
    assert any("label 5 of patient 8" in m for m in labels)
    assert "column 'age'" not in by_column


def test_a_single_class_is_a_label_problem(omop_sqlite: str) -> None:
    query = "SELECT person_id, 2024 - year_of_birth AS age, 0 AS ckd FROM person"
    problems = problems_of(cohort(omop_sqlite, query=query, feature_columns=("age",)))
    assert problems == ["column 'ckd': only 1 class among the usable patients: nothing to learn"]


# --------------------------------------------------------------------------- targets


def regression(url: str, **changes: object) -> SQLSourceConfig:
    """The OMOP regression cohort: no label, the latest creatinine as the target."""
    config = SQLSourceConfig(
        url=url,
        query=OMOP_REGRESSION_QUERY,
        id_column="person_id",
        feature_columns=OMOP_REGRESSION_FEATURES,
        target_column=OMOP_REGRESSION_TARGET,
        missing="drop",
        name="omop-creatinine",
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def latest_creatinine(url: str) -> dict[int, float]:
    """Each person's latest creatinine (latest date, then latest id), computed in Python."""
    m = omop_metadata().tables["measurement"]
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                m.c.person_id, m.c.measurement_date, m.c.measurement_id, m.c.value_as_number
            ).where(m.c.measurement_concept_id == 3016723)
        ).all()
    engine.dispose()
    latest: dict[int, tuple[object, int, float]] = {}
    for pid, date, mid, value in rows:
        if pid not in latest or (date, mid) > latest[pid][:2]:
            latest[pid] = (date, mid, value)
    return {pid: value for pid, (_, _, value) in latest.items()}


def check_regression_cohort(url: str) -> None:
    source = SQLSource(regression(url))
    info = source.describe()
    kept, _ = expected_cohort(url)  # persons with HbA1c measured
    creatinine = latest_creatinine(url)
    assert info.count() == len(kept) < N_PERSONS
    assert info.target is not None
    assert info.target.name == "creatinine"
    # Every person has a creatinine: the target column itself misses nothing.
    assert (info.target.count, info.target.missing) == (N_PERSONS, 0)
    assert info.target.mean == pytest.approx(np.mean(list(creatinine.values())))
    assert any("no label column" in note for note in info.notes)
    person = omop_metadata().tables["person"]
    engine = create_engine(url)
    with engine.connect() as connection:
        born = dict(connection.execute(select(person.c.person_id, person.c.year_of_birth)).all())
    engine.dispose()
    for split in ("train", "test"):
        ids = [p for p in kept if hash_split(str(p), 0.2) == split]
        x, labels = source.load(split)
        y = source.targets(split)
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, [creatinine[p] for p in ids])
        # The same order as the features: each row's age is that person's.
        assert x[:, 0].tolist() == [2024 - born[p] for p in ids]
        assert labels.tolist() == [0] * len(ids)


def test_an_omop_query_derives_a_real_valued_target(omop_sqlite: str) -> None:
    check_regression_cohort(omop_sqlite)
    # The latest value, not any other one: some persons' measurements differ.
    m = omop_metadata().tables["measurement"]
    engine = create_engine(omop_sqlite)
    with engine.connect() as connection:
        first = dict(
            connection.execute(
                select(m.c.person_id, func.min(m.c.value_as_number))
                .where(m.c.measurement_concept_id == 3016723)
                .group_by(m.c.person_id)
            ).all()
        )
    engine.dispose()
    latest = latest_creatinine(omop_sqlite)
    assert sum(first[p] != latest[p] for p in latest) > N_PERSONS // 4


# The target column y: text for patient 3, NULL for 5, +infinity for 8 (SQLite reads 1e999
# as inf; it cannot hold a NaN, which it stores as NULL).
BAD_TARGETS = """
    SELECT person_id, 2024 - year_of_birth AS age,
           CASE WHEN person_id = 3 THEN 'high' WHEN person_id = 5 THEN NULL
                WHEN person_id = 8 THEN 1e999 ELSE year_of_birth / 10.0 END AS y
      FROM person"""


def by_column(problems: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in problems:
        column, _, message = problem.partition(": ")
        found.setdefault(column, []).append(message)
    return found


@pytest.mark.parametrize("missing", ["refuse", "drop"])
def test_bad_targets_are_reported_by_column_and_patient(omop_sqlite: str, missing: str) -> None:
    config = regression(omop_sqlite, query=BAD_TARGETS, feature_columns=("age",), target_column="y")
    problems = by_column(problems_of(replace(config, missing=missing)))  # type: ignore[arg-type]
    assert set(problems) == {"column 'y'"}  # not the features, not the id
    found = problems["column 'y'"]
    assert any(m.startswith("holds str values, not numbers (patient 3)") for m in found)
    assert any(m.startswith("inf is not a finite number (patient 8)") for m in found)
    null = [m for m in found if "missing (NULL)" in m]
    if missing == "refuse":
        assert null == [
            f"1 of {N_PERSONS} values are missing (NULL) (patients 5); fill them in the query "
            '(e.g. COALESCE) or set missing = "drop"'
        ]
    else:
        assert null == []  # dropping a patient without a target is allowed...


def test_a_null_target_is_left_out_and_counted_with_drop(omop_sqlite: str) -> None:
    query = BAD_TARGETS.replace("'high'", "1.0").replace("1e999", "2.0")
    config = regression(omop_sqlite, query=query, feature_columns=("age",), target_column="y")
    source = SQLSource(config)
    info = source.describe()
    assert info.count() == N_PERSONS - 1  # ...and it is left out
    assert info.target is not None
    assert (info.target.count, info.target.missing) == (N_PERSONS - 1, 1)
    assert f"column 'y': 1 of {N_PERSONS} values missing" in info.notes
    assert f"1 of {N_PERSONS} patients dropped for a missing feature or target" in info.notes
    ages = np.concatenate([source.load(s)[0][:, 0] for s in ("train", "test")])
    targets = np.concatenate([source.targets(s) for s in ("train", "test")])
    assert len(targets) == N_PERSONS - 1
    # Each target still sits next to its own patient's features: y = year_of_birth / 10
    # except patients 3 and 8, whose rows say 1.0 and 2.0.
    born = (2024 - ages) / 10.0
    assert int(np.sum(~np.isclose(targets, born))) == 2


def test_target_configuration_errors_are_named(omop_sqlite: str) -> None:
    with pytest.raises(ValueError, match="a label column, a target column, or both"):
        regression(omop_sqlite, target_column=None)
    with pytest.raises(ValueError, match="'hba1c' is also a feature column"):
        regression(omop_sqlite, target_column="hba1c")
    with pytest.raises(ValueError, match="classes name the values of a label column"):
        regression(omop_sqlite, classes=("0", "1"))
    problems = problems_of(regression(omop_sqlite, target_column="egfr"))
    assert problems[0].startswith("column 'egfr': target column not yielded by the query")
    with pytest.raises(DataError, match="declares no target_column"):
        SQLSource(cohort(omop_sqlite)).targets("train")


def test_a_label_and_a_target_together(omop_sqlite: str) -> None:
    """Both roles in one query: labels for classification, targets for regression, each
    next to its own patient's features."""
    query = """
        SELECT person_id, 2024 - year_of_birth AS age, person_id % 2 AS ckd,
               year_of_birth / 10.0 AS y
          FROM person"""
    config = regression(
        omop_sqlite, query=query, feature_columns=("age",), target_column="y", label_column="ckd"
    )
    source = SQLSource(config)
    x, labels = source.load("train")
    ids = [p for p in range(1, N_PERSONS + 1) if hash_split(str(p), 0.2) == "train"]
    assert labels.tolist() == [p % 2 for p in ids]
    np.testing.assert_allclose(source.targets("train"), (2024 - x[:, 0]) / 10.0, rtol=1e-6)
    assert not any("no label column" in note for note in source.describe().notes)
    # A label with one class leaves the source usable for regression: a note, not an error.
    info = SQLSource(replace(config, query=query.replace("person_id % 2", "0"))).describe()
    assert (
        "column 'ckd': only 1 class among the usable patients: nothing to learn (as a label)"
        in info.notes
    )


def test_the_readme_regression_example_reads_an_omop_database(
    omop_sqlite: str, tmp_path: Path
) -> None:
    """The README's copyable [data] table, as written, over the test's OMOP database."""
    import tomllib

    from peer.data import data_source

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("#### Regression targets from a SQL source", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    source = data_source(tomllib.loads(block)["data"], tmp_path, "sqlite:///unused.db")
    assert isinstance(source, SQLSource)
    assert source.config.url == omop_sqlite  # sqlite:///omop.db, relative to the TOML file
    info = source.describe()
    assert info.target is not None
    assert info.target.name == "creatinine"
    np.testing.assert_allclose(
        source.targets("train"), SQLSource(regression(omop_sqlite)).targets("train")
    )


# --------------------------------------------------------------------------- read-only

WRITING_QUERIES = [
    "DELETE FROM person",
    "SELECT person_id FROM person; DELETE FROM person",
    "INSERT INTO person VALUES (999, 8507, 1950)",
    "UPDATE person SET year_of_birth = 1900",
    "DROP TABLE measurement",
    "CREATE TABLE stolen AS SELECT * FROM person",
    "WITH gone AS (DELETE FROM person RETURNING *) SELECT * FROM gone",
    "SELECT * INTO stolen FROM person",
    "PRAGMA journal_mode = DELETE",
    "ATTACH DATABASE '/tmp/x.db' AS x",
    "/* SELECT */ DELETE FROM person",
]


@pytest.mark.parametrize("query", WRITING_QUERIES)
def test_a_query_that_writes_is_refused_and_the_database_unchanged(
    omop_sqlite: str, query: str
) -> None:
    before = fingerprint(omop_sqlite)
    with pytest.raises(ReadOnlyError):
        SQLSource(cohort(omop_sqlite, query=query)).describe()
    assert fingerprint(omop_sqlite) == before


def test_keywords_inside_literals_and_comments_are_not_statements() -> None:
    check_select_only("-- DELETE everything? no\nSELECT 'DROP TABLE person; --' AS note;")
    check_select_only('WITH x AS (SELECT 1 AS "update") SELECT * FROM x /* insert */')
    check_select_only("SELECT $$; DELETE FROM person$$ AS quoted")
    with pytest.raises(ReadOnlyError, match="unterminated"):
        check_select_only("SELECT 'open")


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_any_literal_is_skipped_and_a_statement_after_it_is_seen(content: str) -> None:
    """Whatever a literal or comment holds, the scanner skips exactly it: the query passes
    alone and is refused with a second statement after it."""
    standard = "'" + content.replace("'", "''") + "'"
    escaped = "E'" + content.replace("\\", "\\\\").replace("'", "\\'") + "'"
    comment = "/*" + content.replace("*/", "") + "*/"
    for piece in (standard, escaped, comment):
        check_select_only(f"SELECT {piece} AS x")
        with pytest.raises(ReadOnlyError, match="more than one statement"):
            check_select_only(f"SELECT {piece} AS x; DELETE FROM person")


def test_the_connection_itself_is_read_only_even_without_the_text_check(
    omop_sqlite: str,
) -> None:
    """Layer 2 alone: a writing statement sent straight through the source's engine fails."""
    before = fingerprint(omop_sqlite)
    engine = read_only_engine(omop_sqlite)
    with engine.connect() as connection, pytest.raises(Exception, match=r"readonly|read-only"):
        connection.execute(text("DELETE FROM person"))
    engine.dispose()
    assert fingerprint(omop_sqlite) == before


def test_urls_whose_read_only_cannot_be_enforced_are_refused(tmp_path: Path) -> None:
    for url, reason in [
        ("mysql+pymysql://reader@db/omop", "cannot be enforced for 'mysql'"),
        ("sqlite://", "plain sqlite:///path"),
        ("postgresql+pg8000://reader@db/omop", "driver 'pg8000' is not supported"),
        ("postgresql+psycopg2://reader@db/omop", "driver 'psycopg2' is not supported"),
        (f"sqlite:///file:{tmp_path}/x.db?mode=rw&uri=true", "plain sqlite:///path"),
    ]:
        with pytest.raises(ReadOnlyError, match=reason):
            read_only_engine(url)


def test_a_password_in_the_url_is_never_shown() -> None:
    source = SQLSource(cohort("postgresql+psycopg://reader:hunter2@127.0.0.1:1/omop"))
    assert source.location == "postgresql+psycopg://reader:***@127.0.0.1:1/omop"
    with pytest.raises(SourceError) as caught:  # nothing listens on port 1
        source.describe()
    assert "hunter2" not in str(caught.value)
    assert "the query failed" in str(caught.value)


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(SourceError, match="the query failed"):
        SQLSource(cohort(f"sqlite:///{path}")).describe()
    assert not path.exists()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def omop_postgres(postgres_url: str) -> str:
    import psycopg

    server = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute("CREATE DATABASE omop")
    url = postgres_url.rsplit("/", 1)[0] + "/omop"
    engine = create_engine(url)
    write_omop(engine, N_PERSONS, np.random.default_rng(1))
    with engine.begin() as connection:
        # A function that writes, callable from a SELECT: the text check cannot see it.
        connection.exec_driver_sql(
            "CREATE FUNCTION tamper() RETURNS integer LANGUAGE sql AS "
            "'DELETE FROM measurement; SELECT 1'"
        )
    engine.dispose()
    return url


def test_the_omop_cohort_on_postgresql(omop_postgres: str, omop_sqlite: str) -> None:
    check_cohort(omop_postgres)
    # The same synthetic database on both backends gives the same records.
    x_pg, y_pg = SQLSource(cohort(omop_postgres)).load("train")
    x_lite, y_lite = SQLSource(cohort(omop_sqlite)).load("train")
    np.testing.assert_allclose(x_pg, x_lite, rtol=1e-6)
    np.testing.assert_array_equal(y_pg, y_lite)


def test_the_regression_cohort_on_postgresql(omop_postgres: str, omop_sqlite: str) -> None:
    check_regression_cohort(omop_postgres)
    y_pg = SQLSource(regression(omop_postgres)).targets("train")
    np.testing.assert_allclose(y_pg, SQLSource(regression(omop_sqlite)).targets("train"))
    # PostgreSQL holds what SQLite cannot: a NaN (missing, like a NULL) and an infinity.
    query = """
        SELECT person_id, 2024 - year_of_birth AS age,
               CASE WHEN person_id = 4 THEN 'NaN'::float8
                    WHEN person_id = 6 THEN '-Infinity'::float8
                    ELSE year_of_birth / 10.0 END AS y
          FROM person"""
    bad = regression(
        omop_postgres, query=query, feature_columns=("age",), target_column="y", missing="refuse"
    )
    problems = by_column(problems_of(bad))
    assert set(problems) == {"column 'y'"}
    assert any(
        m.startswith("-inf is not a finite number (patient 6)") for m in problems["column 'y'"]
    )
    assert any(
        m.startswith("1 of 120 values are missing (NULL) (patients 4)")
        for m in problems["column 'y'"]
    )


def test_a_select_calling_a_writing_function_is_rolled_back_on_postgresql(
    omop_postgres: str,
) -> None:
    before = fingerprint(omop_postgres)
    query = "SELECT person_id, tamper() AS age, 0 AS ckd FROM person"
    check_select_only(query)  # passes the text check: only the transaction stops it
    with pytest.raises(SourceError, match="read-only transaction"):
        SQLSource(cohort(omop_postgres, query=query, feature_columns=("age",))).describe()
    assert fingerprint(omop_postgres) == before
    # A SELECT cannot turn the read-only transaction back into a read-write one either.
    flip = "SELECT person_id, set_config('transaction_read_only', 'off', true) AS age FROM person"
    with pytest.raises(SourceError, match="the query failed"):
        SQLSource(cohort(omop_postgres, query=flip, feature_columns=("age",))).describe()
    assert fingerprint(omop_postgres) == before


# PostgreSQL's E'...' strings escape a quote with a backslash: a scanner that ignored it would
# end the literal early, take the next quote as opening one, and so not see the statements
# after it. Here they would commit the read-only transaction, open a read-write one and
# delete every measurement (PostgreSQL runs all of them if it receives them in one simple
# query message, read-only session or not: checked by hand with psycopg's default protocol).
SMUGGLED = (
    "SELECT E'\\'' AS age, 1 AS person_id, 0 AS ckd; COMMIT; BEGIN READ WRITE; "
    "DELETE FROM measurement; COMMIT; SELECT '--'"
)


def test_a_statement_smuggled_past_an_escaped_quote_is_refused() -> None:
    with pytest.raises(ReadOnlyError, match="more than one statement"):
        check_select_only(SMUGGLED)
    # Likewise a$b$ is an identifier in PostgreSQL, not the start of a $b$ quote.
    with pytest.raises(ReadOnlyError, match="more than one statement"):
        check_select_only("SELECT 1 AS a$b$; DELETE FROM measurement; SELECT 1 AS c$b$")


def test_a_smuggled_statement_is_refused_by_postgresql_itself(
    omop_postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer 2 alone: with the text check switched off, the server still runs only one
    statement (the extended query protocol), so nothing is committed or deleted."""
    before = fingerprint(omop_postgres)
    monkeypatch.setattr("peer.data.sql.check_select_only", lambda query: None)
    source = SQLSource(cohort(omop_postgres, query=SMUGGLED, feature_columns=("age",)))
    with pytest.raises(SourceError, match="the query failed"):
        source.describe()
    assert fingerprint(omop_postgres) == before


def test_writing_queries_are_refused_on_postgresql(omop_postgres: str) -> None:
    before = fingerprint(omop_postgres)
    for query in WRITING_QUERIES:
        with pytest.raises(ReadOnlyError):
            SQLSource(cohort(omop_postgres, query=query)).describe()
    engine = read_only_engine(omop_postgres)
    with engine.connect() as connection, pytest.raises(Exception, match="read-only"):
        connection.execute(text("DELETE FROM person"))
    engine.dispose()
    assert fingerprint(omop_postgres) == before

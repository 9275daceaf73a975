"""An example SQL source: a cohort query over the OMOP Common Data Model.

Only the three OMOP CDM v5.4 tables the example reads are defined here, with the columns it
uses (``person``, ``condition_occurrence``, ``measurement``); a real OMOP database has many
more, which the query simply ignores. :func:`write_synthetic_omop` fills them with synthetic
patients so that tests and demos have an OMOP database to point a peer at.

The cohort: one row per person, with features derived in SQL (age, sex, mean HbA1c and mean
serum creatinine over the person's measurements -- NULL if never measured) and the label
"has a chronic kidney disease condition". The matching ``[data]`` table::

    [data]
    source = "sql"
    name = "omop-ckd"
    url = "sqlite:///omop.db"
    query = '''...OMOP_COHORT_QUERY...'''
    id = "person_id"
    features = ["age", "female", "hba1c", "creatinine"]
    label = "ckd"
    missing = "drop"

A regression cohort (:data:`OMOP_REGRESSION_QUERY`) reads the same tables for a real-valued
outcome: each person's latest serum creatinine, predicted from age, sex and mean HbA1c::

    [data]
    source = "sql"
    url = "sqlite:///omop.db"
    query = '''...OMOP_REGRESSION_QUERY...'''
    id = "person_id"
    features = ["age", "female", "hba1c"]
    target_column = "creatinine"    # no label: a regression-only data set
    missing = "drop"
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from sqlalchemy import (
    Column,
    Date,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    insert,
)

__all__ = [
    "CKD_CONCEPT",
    "CREATININE_CONCEPT",
    "FEMALE_CONCEPT",
    "HBA1C_CONCEPT",
    "MALE_CONCEPT",
    "OMOP_COHORT_FEATURES",
    "OMOP_COHORT_QUERY",
    "OMOP_REGRESSION_FEATURES",
    "OMOP_REGRESSION_QUERY",
    "OMOP_REGRESSION_TARGET",
    "omop_metadata",
    "write_synthetic_omop",
]

# Standard OMOP concept ids (OHDSI Athena vocabularies).
FEMALE_CONCEPT = 8532
MALE_CONCEPT = 8507
CKD_CONCEPT = 46271022  # Chronic kidney disease (SNOMED 709044004)
HBA1C_CONCEPT = 3004410  # Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4)
CREATININE_CONCEPT = 3016723  # Creatinine [Mass/volume] in Serum or Plasma (LOINC 2160-0)

OMOP_COHORT_FEATURES = ("age", "female", "hba1c", "creatinine")

# Portable SQL (SQLite and PostgreSQL alike): correlated subqueries, no dialect functions.
# The concept ids are the constants above, written out (a constant query, nothing formatted in).
OMOP_COHORT_QUERY = """
SELECT p.person_id,
       2024 - p.year_of_birth AS age,
       CASE WHEN p.gender_concept_id = 8532 THEN 1 ELSE 0 END AS female,
       (SELECT AVG(m.value_as_number) FROM measurement m
         WHERE m.person_id = p.person_id
           AND m.measurement_concept_id = 3004410) AS hba1c,
       (SELECT AVG(m.value_as_number) FROM measurement m
         WHERE m.person_id = p.person_id
           AND m.measurement_concept_id = 3016723) AS creatinine,
       CASE WHEN EXISTS (SELECT 1 FROM condition_occurrence c
                          WHERE c.person_id = p.person_id
                            AND c.condition_concept_id = 46271022)
            THEN 1 ELSE 0 END AS ckd
  FROM person p
 ORDER BY p.person_id
"""

OMOP_REGRESSION_FEATURES = ("age", "female", "hba1c")
OMOP_REGRESSION_TARGET = "creatinine"

# The latest measurement is the one with the latest date (ties: the later measurement id),
# picked by a correlated subquery with ORDER BY ... LIMIT 1 (SQLite and PostgreSQL alike).
OMOP_REGRESSION_QUERY = """
SELECT p.person_id,
       2024 - p.year_of_birth AS age,
       CASE WHEN p.gender_concept_id = 8532 THEN 1 ELSE 0 END AS female,
       (SELECT AVG(m.value_as_number) FROM measurement m
         WHERE m.person_id = p.person_id
           AND m.measurement_concept_id = 3004410) AS hba1c,
       (SELECT m.value_as_number FROM measurement m
         WHERE m.person_id = p.person_id
           AND m.measurement_concept_id = 3016723
         ORDER BY m.measurement_date DESC, m.measurement_id DESC
         LIMIT 1) AS creatinine
  FROM person p
 ORDER BY p.person_id
"""


def omop_metadata() -> MetaData:
    """The three OMOP CDM tables of the example (the columns it uses, OMOP's names), with
    the person_id indexes of the OMOP DDL (without them each correlated subquery of the
    cohort scans the whole table)."""
    metadata = MetaData()
    Table(
        "person",
        metadata,
        Column("person_id", Integer, primary_key=True, autoincrement=False),
        Column("gender_concept_id", Integer, nullable=False),
        Column("year_of_birth", Integer, nullable=False),
    )
    Table(
        "condition_occurrence",
        metadata,
        Column("condition_occurrence_id", Integer, primary_key=True, autoincrement=False),
        Column("person_id", Integer, ForeignKey("person.person_id"), nullable=False, index=True),
        Column("condition_concept_id", Integer, nullable=False),
        Column("condition_start_date", Date, nullable=False),
    )
    Table(
        "measurement",
        metadata,
        Column("measurement_id", Integer, primary_key=True, autoincrement=False),
        Column("person_id", Integer, ForeignKey("person.person_id"), nullable=False, index=True),
        Column("measurement_concept_id", Integer, nullable=False),
        Column("measurement_date", Date, nullable=False),
        Column("value_as_number", Float, nullable=True),
    )
    return metadata


def write_synthetic_omop(engine: Engine, n_persons: int, rng: np.random.Generator) -> None:
    """Create the example tables and fill them with ``n_persons`` synthetic patients.

    CKD is more likely with age and creatinine; about 10% of persons never had HbA1c
    measured (so the cohort query yields NULL for them), and a few have other conditions.
    """
    metadata = omop_metadata()
    metadata.create_all(engine)
    persons, conditions, measurements = [], [], []
    day = dt.date(2023, 1, 1)
    for pid in range(1, n_persons + 1):
        age = int(rng.integers(30, 90))
        female = bool(rng.random() < 0.5)
        creatinine = float(rng.normal(0.9 + 0.012 * (age - 30), 0.25))
        risk = 1.0 / (1.0 + np.exp(-(4.0 * (creatinine - 1.3) + 0.03 * (age - 60))))
        ckd = bool(rng.random() < risk)
        persons.append(
            {
                "person_id": pid,
                "gender_concept_id": FEMALE_CONCEPT if female else MALE_CONCEPT,
                "year_of_birth": 2024 - age,
            }
        )
        if ckd:
            conditions.append((pid, CKD_CONCEPT))
        if rng.random() < 0.2:
            conditions.append((pid, 201826))  # type 2 diabetes: not the label
        # A person's measurements fall on successive days (so one of them is the latest).
        for k in range(int(rng.integers(1, 4))):
            measurements.append(
                (pid, CREATININE_CONCEPT, creatinine + rng.normal(0, 0.05), day + dt.timedelta(k))
            )
        if rng.random() >= 0.1:
            measurements.append((pid, HBA1C_CONCEPT, float(rng.normal(5.8, 0.8)), day))
    tables = metadata.tables
    with engine.begin() as connection:
        connection.execute(insert(tables["person"]), persons)
        if conditions:
            connection.execute(
                insert(tables["condition_occurrence"]),
                [
                    {
                        "condition_occurrence_id": i,
                        "person_id": pid,
                        "condition_concept_id": concept,
                        "condition_start_date": day,
                    }
                    for i, (pid, concept) in enumerate(conditions, start=1)
                ],
            )
        connection.execute(
            insert(tables["measurement"]),
            [
                {
                    "measurement_id": i,
                    "person_id": pid,
                    "measurement_concept_id": concept,
                    "measurement_date": date,
                    "value_as_number": float(value),
                }
                for i, (pid, concept, value, date) in enumerate(measurements, start=1)
            ],
        )

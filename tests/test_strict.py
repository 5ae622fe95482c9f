"""The strict base refuses unknown fields, and explain() says why input was refused, one way."""

from __future__ import annotations

import pytest
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from quantfleet.strict import Problem, Strict, explain, problems


class Inner(Strict):
    port: int = Field(ge=1)


class Outer(Strict):
    name: str = Field(min_length=1)
    inner: Inner = Field(default_factory=lambda: Inner(port=1))

    @field_validator("name")
    @classmethod
    def _no_spaces(cls, v: str) -> str:
        if " " in v:
            raise ValueError("no spaces in a name")
        return v

    @model_validator(mode="after")
    def _whole(self) -> Outer:
        if self.name == "forbidden":
            raise ValueError("this name is taken")
        return self


class Aliased(Strict):
    model_config = ConfigDict(populate_by_name=True, frozen=True)

    from_: str = Field(alias="from")


def refusal(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return info.value


def test_unknown_fields_are_refused_and_subclass_settings_merge() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        Inner.model_validate({"port": 1, "prot": 2})
    assert Aliased(from_="a").from_ == Aliased.model_validate({"from": "a"}).from_
    with pytest.raises(ValidationError, match="Extra inputs"):
        Aliased.model_validate({"from": "a", "to": "b"})
    with pytest.raises(ValidationError, match="frozen"):
        Aliased(from_="a").from_ = "b"  # type: ignore[misc]


def test_the_first_error_in_the_projects_words() -> None:
    assert explain(refusal({"name": "x", "inner": {"port": 1, "prot": 2}})) \
        == "inner.prot: unknown field"
    assert explain(refusal({"name": "a b"})) == "name: no spaces in a name"
    assert explain(refusal({"name": "x", "bogus": 1}), where="agent.toml",
                   unknown="unknown option") == "agent.toml: bogus: unknown option"


def test_pydantic_words_are_kept_on_request() -> None:
    exc = refusal({"name": "a b", "bogus": 1})
    assert explain(exc, pydantic_words=True, rest="list") \
        == "name: Value error, no spaces in a name; bogus: Extra inputs are not permitted"


def test_an_error_about_the_whole_input() -> None:
    exc = refusal({"name": "forbidden"})
    assert explain(exc) == "this name is taken"
    assert explain(exc, where="spec.yaml", whole="spec") == "spec.yaml: spec: this name is taken"
    assert explain(refusal([1]), where="f") \
        == "f: Input should be a valid dictionary or instance of Outer"


def test_the_rest_omitted_counted_or_listed() -> None:
    exc = refusal({"name": "", "inner": {"port": 0}, "bogus": 1})
    assert exc.error_count() == 3
    assert explain(exc, where="f") == "f: name: String should have at least 1 character"
    assert explain(exc, where="f", rest="count") \
        == "f: name: String should have at least 1 character (and 2 more)"
    assert explain(exc, where="f", rest="list") == (
        "f: name: String should have at least 1 character; "
        "f: inner.port: Input should be greater than or equal to 1; f: bogus: unknown field")
    assert explain(refusal({"name": ""}), rest="count") \
        == "name: String should have at least 1 character"


def test_problems_give_the_location_apart() -> None:
    found = problems(refusal({"name": "x", "inner": {"port": "many"}}))
    assert found == [Problem("inner.port",
                             "Input should be a valid integer, unable to parse string as an "
                             "integer")]
    assert str(found[0]).startswith("inner.port: Input should be a valid integer")
    assert str(Problem("", "bad")) == "bad"

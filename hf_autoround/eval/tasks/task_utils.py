"""Document processing for the local lm-eval tasks (copied next to the generated task YAMLs at run time).

HellaSwag: the query is "<activity>: <ctx_a> <Ctx_b>" and the endings are the choices, with WikiHow's bracketed
headings removed. WinoGrande is scored by *partial evaluation*: each option fills the blank in the context, and the
shared continuation after the blank is what is scored.
"""
import re


def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def convert(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean(doc["activity_label"] + ": " + ctx),
                "choices": [_clean(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(convert)


def _blank(doc) -> int:
    return doc["sentence"].index("_")


def winogrande_gold_index(doc) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc) -> list:
    head = doc["sentence"][: _blank(doc)]
    return [head + doc["option1"], head + doc["option2"]]


def winogrande_continuation(doc) -> str:
    return " " + doc["sentence"][_blank(doc) + 1:].strip()

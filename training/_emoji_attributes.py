"""Attributes of an emoji image from its Unicode code points: skin tones, gender, hair, age, number of people.

The rules (see `training/DATASET.md`) read the full code point sequence of one image, skin-tone modifiers
included, plus its `emoji.json` subcategory for people whose code points do not say so.
"""

from typing import Dict, List, Sequence, Tuple


# Fitzpatrick modifiers U+1F3FB..1F3FF: 1 = light (type 1-2) ... 5 = dark (type 6); 0 means no modifier.
SKIN_TONES = {"1F3FB": 1, "1F3FC": 2, "1F3FD": 3, "1F3FE": 4, "1F3FF": 5}
SKIN_TONE_NAMES = {0: "none", 1: "light", 2: "medium-light", 3: "medium", 4: "medium-dark", 5: "dark"}
FEMALE_SIGN, MALE_SIGN = "2640", "2642"
JOINERS = {"200D", "FE0F", "FE0E"}

# Code points that are people, with the gender and age they show. Boys and girls count as man and woman.
PERSON_CODEPOINTS = {
    "1F468": ("man", "adult"),
    "1F469": ("woman", "adult"),
    "1F9D1": ("person", "adult"),
    "1F466": ("man", "child"),
    "1F467": ("woman", "child"),
    "1F476": ("person", "baby"),
    "1F9D2": ("person", "child"),
    "1F474": ("man", "older"),
    "1F475": ("woman", "older"),
    "1F9D3": ("person", "older"),
    "1F471": ("person", "adult"),  # person: blond hair
    "1F9D4": ("person", "adult"),  # person: beard
}
HAIR_CODEPOINTS = {
    "1F9B0": "red",
    "1F9B1": "curly",
    "1F9B2": "bald",
    "1F9B3": "white",
    "1F471": "blond",
    "1F9D4": "beard",
}
HAIR_TYPES = ("red", "curly", "white", "bald", "blond", "beard")

# Single code points whose people are implied by the character itself. Genders follow the CLDR short names, which
# describe today's glyphs (e.g. U+1F473 is "person wearing turban" although its Unicode name says "MAN").
IMPLIED_PEOPLE = {
    "1F385": [("man", "adult")],  # Santa Claus
    "1F936": [("woman", "adult")],  # Mrs. Claus
    "1F478": [("woman", "adult")],  # princess
    "1F934": [("man", "adult")],  # prince
    "1F930": [("woman", "adult")],  # pregnant woman
    "1FAC3": [("man", "adult")],  # pregnant man
    "1F483": [("woman", "adult")],  # woman dancing
    "1F57A": [("man", "adult")],  # man dancing
    "1F47C": [("person", "baby")],  # baby angel
    "1F46B": [("woman", "adult"), ("man", "adult")],  # woman and man holding hands
    "1F46C": [("man", "adult"), ("man", "adult")],
    "1F46D": [("woman", "adult"), ("woman", "adult")],
    "1F48F": [("person", "adult"), ("person", "adult")],  # kiss
    "1F491": [("person", "adult"), ("person", "adult")],  # couple with heart
    "1F46F": [("person", "adult"), ("person", "adult")],  # people with bunny ears
    "1F93C": [("person", "adult"), ("person", "adult")],  # wrestlers
    "1FAC2": [("person", "adult"), ("person", "adult")],  # people hugging
    "1F465": [("person", "adult"), ("person", "adult")],  # busts in silhouette
    "1F46A": [("person", "adult"), ("person", "adult"), ("person", "child")],  # family (both vendors draw 2+1)
    "1F464": [("person", "adult")],  # bust in silhouette
    "1F5E3": [("person", "adult")],  # speaking head
}
# Subcategories whose emoji show one person unless the code points say otherwise. Hands and body parts are not
# people even though they take skin tones.
PERSON_SUBCATEGORIES = {
    "person",
    "person-activity",
    "person-fantasy",
    "person-gesture",
    "person-resting",
    "person-role",
    "person-sport",
    "family",
}


def split_codepoints(unified: str) -> List[str]:
    return [cp.upper() for cp in unified.split("-") if cp]


def skin_tones_of(unified: str) -> List[int]:
    """The Fitzpatrick levels (1-5) in a sequence, in order; empty when it has no modifier."""
    return [SKIN_TONES[cp] for cp in split_codepoints(unified) if cp in SKIN_TONES]


def people_of(unified: str, subcategory: str) -> List[Tuple[str, str]]:
    """(gender, age) of every person an emoji shows, from its code points, or its character, or its subcategory."""
    codepoints = [cp for cp in split_codepoints(unified) if cp not in SKIN_TONES and cp not in JOINERS]
    people = [PERSON_CODEPOINTS[cp] for cp in codepoints if cp in PERSON_CODEPOINTS]
    if not people and codepoints and codepoints[0] in IMPLIED_PEOPLE:
        people = list(IMPLIED_PEOPLE[codepoints[0]])
    if not people and subcategory in PERSON_SUBCATEGORIES:
        people = [("person", "adult")]
    # The ZWJ gender signs turn gender-neutral people into men or women ("woman running", "men wrestling").
    sign = "woman" if FEMALE_SIGN in codepoints else "man" if MALE_SIGN in codepoints else None
    if sign is not None:
        people = [(sign if gender == "person" else gender, age) for gender, age in people]
    return people


def combined(values: Sequence[str]) -> str:
    """One label for a group: "none" when empty, the shared value, or "mixed"."""
    if not values:
        return "none"
    return values[0] if len(set(values)) == 1 else "mixed"


def hair_of(unified: str) -> str:
    hairs = [HAIR_CODEPOINTS[cp] for cp in split_codepoints(unified) if cp in HAIR_CODEPOINTS]
    return hairs[0] if hairs else "none"


def emoji_attributes(unified: str, subcategory: str) -> Dict[str, object]:
    """All attribute columns of one image, from its full code point sequence (skin tones included)."""
    people = people_of(unified, subcategory)
    tones = skin_tones_of(unified)
    gender = combined([gender for gender, _ in people])
    age = combined([age for _, age in people])
    hair = hair_of(unified)
    # Two-person emoji with one modifier (e.g. U+1F46B U+1F3FD) show both people in that tone.
    skin_tone = tones[0] if tones else 0
    skin_tone_2 = tones[1] if len(tones) > 1 else skin_tone
    return {
        "skin_tone": skin_tone,
        "skin_tone_2": skin_tone_2,
        "has_skin_tone": skin_tone > 0,
        "mixed_skin_tone": skin_tone != skin_tone_2,
        "gender": gender,
        "hair": hair,
        "age": age,
        "num_people": len(people),
        "is_person": len(people) > 0,
        "is_man": gender == "man",
        "is_woman": gender == "woman",
        "dark_skin": skin_tone >= 4,
        "light_skin": 1 <= skin_tone <= 2,
        **{("beard" if h == "beard" else f"hair_{h}"): hair == h for h in HAIR_TYPES},
        "is_older": age == "older",
        "is_child_or_baby": age in ("child", "baby"),
    }

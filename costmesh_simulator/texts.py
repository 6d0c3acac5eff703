"""What a realistic simulator says without a reference answer to give: support-style
sentences for an unknown question, deflections for a wrong one, and the word to pick
when the instructions offer a choice of words."""

from __future__ import annotations

import re

# A generic answer: an opener, steps until it is long enough, a closer.
OPENERS = (
    "Thanks for reaching out, and sorry for the trouble.",
    "Happy to help with that.",
    "Thank you for contacting us about this.",
    "I understand, let me walk you through it.",
)
STEPS = (
    "First, sign in to your account and open the Settings page.",
    "Check that the details we have on file, such as your email and billing address, are "
    "up to date.",
    "Most requests like this are processed within two to three business days.",
    "You will receive a confirmation email as soon as the change has gone through.",
    "If you made the request recently, it may still be pending on our side.",
    "For your security, we may ask you to confirm your identity before making changes.",
    "You can follow the status at any time under Orders or Activity in the app.",
    "If anything looks wrong, a screenshot helps our team look into it faster.",
    "Some changes cannot be undone once confirmed, so please review them first.",
    "Charges and refunds usually appear on your statement within a few days.",
    "If you use the mobile app, make sure it is updated to the latest version.",
    "Our support team is available around the clock through chat and email.",
)
CLOSERS = (
    "Let me know if there is anything else I can help with.",
    "If the problem persists, reply to this message and we will look into it.",
    "Is there anything else I can do for you today?",
)
# Plausible but unhelpful: half of the wrong answers, and all where no other answer fits.
DEFLECTIONS = (
    "I'm sorry, but I don't have enough information to help with that. Please contact "
    "our support team directly.",
    "Thank you for your message. You can find more information on this topic in our Help Center.",
    "Unfortunately I'm unable to assist with this request right now. Please try again later.",
    "Could you provide more details about your issue so that we can look into it?",
)

_ONE_WORD = re.compile(r"\bone word\s*:\s*([^.:;]+)", re.IGNORECASE)
_ASIDE = re.compile(r"\s*\([^()]*\)")
_OPTION_SPLIT = re.compile(r",\s*(?:or\s+)?|\s+or\s+")
_WORD = re.compile(r"[\w-]+")


def one_word_options(instructions: tuple[str, ...]) -> list[str]:
    """The words offered by an instruction such as "Reply with one word: positive, neutral
    or negative." (asides in parentheses aside); empty when there is no such list."""
    for text in instructions:
        found = _ONE_WORD.search(_ASIDE.sub("", text))
        if found:
            options = [o.strip() for o in _OPTION_SPLIT.split(found.group(1)) if o.strip()]
            if len(options) > 1 and all(_WORD.fullmatch(o) for o in options):
                return options
    return []

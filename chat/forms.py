from __future__ import annotations

from django import forms

from chat.sending import MAX_MESSAGE_CHARS


class SendForm(forms.Form):
    # The id is made when the composer is rendered: it becomes the message's primary key
    # and the gateway's idempotencyKey, so a double submit cannot send twice.
    message_id = forms.UUIDField()
    text = forms.CharField(
        max_length=MAX_MESSAGE_CHARS,
        error_messages={
            "required": "Type a message first.",
            "max_length": f"That is too long: at most {MAX_MESSAGE_CHARS:,} characters.",
        },
    )


class AbortForm(forms.Form):
    # Empty: every run of the session. Too long is refused (not read as empty).
    run_id = forms.CharField(
        max_length=200,
        required=False,
        error_messages={
            "max_length": "That run id is too long: at most 200 characters."
        },
    )

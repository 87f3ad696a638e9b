"""aiosmtpd handler used by the test harness (tests/harness/peers.rs).

A Maildir like ``aiosmtpd.handlers.Mailbox``, except that recipients whose local part starts
with ``reject`` are refused with a permanent ``550`` and those starting with ``defer`` with a
transient ``451``, so tests can see how the SMTP provider classifies real server replies.

Run as: python3 -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_peer.RejectingMailbox MAILDIR
(with this directory on PYTHONPATH).
"""

from aiosmtpd.handlers import Mailbox


class RejectingMailbox(Mailbox):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local.startswith("reject"):
            return "550 5.1.1 <%s>: Recipient address rejected" % address
        if local.startswith("defer"):
            return "451 4.3.0 <%s>: Temporary failure, try again later" % address
        # Returning a status replaces aiosmtpd's default, which records the recipient.
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

"""An aiosmtpd handler for the integration tests: every accepted message becomes one JSON
file in OUTDIR (written atomically) with the envelope, the raw message, its header
names and decoded text and HTML parts, and the time it was accepted.

    PYTHONPATH=tests/servers python -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_sink.FileSink OUTDIR

Recipients whose local part is `tempfail` get 451 (transient), `reject` get 550
(permanent), so tests can check how kmsguard classifies SMTP errors.

For AUTH (which the aiosmtpd command line cannot configure) run this file itself:

    python smtp_sink.py PORT OUTDIR CERT KEY USER PASSWORD

STARTTLS is then required, and AUTH (PLAIN or LOGIN) with USER and PASSWORD before MAIL.
"""
import email
import email.policy
import json
import os
import time


class FileSink:
    def __init__(self, outdir):
        self.outdir = outdir
        self.n = 0
        os.makedirs(outdir, exist_ok=True)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("smtp_sink.FileSink takes one argument: OUTDIR")
        return cls(args[0])

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local == "tempfail":
            return "451 4.3.0 Try again later"
        if local == "reject":
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        accepted = time.time()
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        record = {
            "accepted_at": accepted,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            # session.ssl is set by STARTTLS; SMTPS (implicit TLS) shows on the transport.
            "tls": session.ssl is not None
            or server.transport.get_extra_info("ssl_object") is not None,
            "authenticated": bool(session.authenticated),
            "login": (session.login_data or b"").decode("utf-8", "replace"),
            "raw": raw.decode("utf-8", "replace"),
            "header_names": list(msg.keys()),
            "subject": str(msg.get("Subject", "")),
            "message_id": str(msg.get("Message-ID", "")),
            "in_reply_to": str(msg.get("In-Reply-To", "")),
            "x_kmsguard_alert": str(msg.get("X-Kmsguard-Alert", "")),
            "text": text.get_content() if text is not None else None,
            "html": html.get_content() if html is not None else None,
        }
        self.n += 1
        name = os.path.join(self.outdir, "%020d-%04d.json" % (time.time_ns(), self.n))
        tmp = name + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, name)
        return "250 2.0.0 OK queued"


def main(argv):
    import ssl
    import threading

    from aiosmtpd.controller import Controller

    port, outdir, cert, key, user, password = argv
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        ok = auth_data.login == user.encode() and auth_data.password == password.encode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    controller = Controller(
        FileSink(outdir),
        hostname="127.0.0.1",
        port=int(port),
        tls_context=ctx,
        require_starttls=True,
        auth_required=True,
        authenticator=authenticator,
    )
    controller.start()
    threading.Event().wait()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

"""ticketgate's ingestion library: RFC822 bytes in, tickets and TicketInfo out.

No sockets and no Celery here; the doors in ``workers`` call :class:`ingest.service.Ingestor`.
"""

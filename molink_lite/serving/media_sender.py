"""A pipeline's images: which ones its first stage holds, and sending a request's images there before its rows.

A request with images (``GenRequest.media``) that joins a pipeline waits (``SeqState.media_wait``) until every image
it names is on that pipeline's first stage. Images sent before and not lost since are not sent again. The first
stage may evict an image (its store is bounded): the step that named it fails, and the pipeline forgets that the
stage held it (:meth:`MediaSender.lost`), so the replay sends it again.

What a failure does:
- the stage refuses an image, or takes too long to encode it: that request fails;
- the link breaks, or the stage answers for another image: the pipeline fails, and its requests replay elsewhere.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable, List, Tuple

from ..wire.channel import ChannelClosed, RemoteError
from ..wire.media import MediaLayout, media_id
from ..wire.protocol import ProtocolError
from .sequence import SeqState


class MediaSender:
    """The images of one pipeline's first stage, as far as the gateway knows (see the module docstring).

    ``put``: sends one image's bytes to the first stage and returns its layout (``Chain.put_media``).
    ``ready``: a waiting sequence may go (the pipeline wakes its scheduler). ``refused``: a sequence fails
    (message). ``broken``: the pipeline fails (message). ``current``: the sequence still runs here, in this epoch.
    """

    def __init__(self, put: Callable[[bytes], Any], *, ready: Callable[[], None],
                 refused: Callable[[SeqState, str], None], broken: Callable[[str], None],
                 current: Callable[[SeqState, int], bool]):
        self._put, self._ready, self._refused, self._broken, self._current = put, ready, refused, broken, current
        self.sent: set = set()   # ids of the images the first stage was sent (it keeps them a while)

    def send_for(self, s: SeqState) -> None:
        """``s`` joins the pipeline: it waits until its images not sent yet are there."""
        need = [(i, d) for i, d in zip(s.req.media.ids, s.req.media.data) if i not in self.sent]
        s.media_wait = bool(need)
        if need:
            asyncio.ensure_future(self._send(s, need, s.epoch))

    async def _send(self, s: SeqState, need: List[Tuple[str, bytes]], epoch: int) -> None:
        try:
            for _, data in need:
                await self.put(data)
        except (RemoteError, asyncio.TimeoutError) as e:
            # the stage refused the image, or is still encoding it (heartbeats tell a dead stage): this request fails
            if self._current(s, epoch) and not s.finished:
                s.media_wait = False
                self._refused(s, f"the image could not be used: {e or 'the first stage took too long'}")
            return
        except (ProtocolError, ChannelClosed, ConnectionError) as e:
            self._broken(f"sending an image to the first stage failed: {e}")
            return
        if self._current(s, epoch):
            s.media_wait = False
            self._ready()

    async def put(self, data: bytes) -> MediaLayout:
        """One image to the first stage: its layout, believed only if it names the image sent
        (:class:`ProtocolError` otherwise)."""
        lay = await self._put(data)
        mid = media_id(data)
        if lay.id != mid:
            raise ProtocolError(f"the first stage names the image {lay.id}, not {mid}")
        self.sent.add(mid)
        return lay

    def lost(self, ids: Iterable[str]) -> None:
        """The first stage may not hold these any more (a step naming them failed)."""
        self.sent.difference_update(ids)

    def forget(self) -> None:
        """The first stage holds nothing (it failed, or released its model)."""
        self.sent.clear()
